"""The three generation tasks (`MeDiMPipeline.text_to_image`, `image_to_report`, `generate_pairs`):
each builds the known positions of its task, samples the rest, and reads images and reports back
out. Their inputs were checked by the pipeline's methods.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from medim.diffusion import tasks
from medim.layout import SequenceLayout
from medim.pipelines.common import (
    MeDiMOutput,
    RunSettings,
    Runtime,
    decode_images,
    encode_images,
    run_chunks,
    shown_inputs,
)

__all__ = ["text_to_image", "image_to_report", "generate_pairs", "prompt_task"]


def prompt_task(layout: SequenceLayout, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                device: torch.device) -> tasks.TaskInputs:
    """Report beginnings known, everything else unknown. A prompt's tokens are its encoded report
    up to padding or the end-of-report id (which must stay free to move)."""
    ids = layout.encode_reports(tokenizer, prompts)
    real = ids != layout.pad_id
    if layout.report_end_id is not None:
        real &= ids != layout.report_end_id
    lengths = real.long().cumprod(1).sum(1)
    return tasks.pair_from_prompt(layout, ids.to(device), lengths)


def text_to_image(rt: Runtime, prompts: list[str], image_size: tuple[int, int], settings: RunSettings) -> MeDiMOutput:
    """One image per report; `image_size` is the size condition of every row."""
    task = tasks.text_to_image(rt.layout, rt.layout.encode_reports(rt.tokenizer, prompts))
    condition = rt.layout.condition(rt.tokenizer, [image_size] * len(prompts))
    tokens, nfe = run_chunks(rt, task, condition, settings)
    return MeDiMOutput(decode_images(rt, tokens, settings.output_type), list(prompts), tokens, nfe)


def image_to_report(rt: Runtime, rgb: list[Image.Image], prompts: list[str] | None,
                    settings: RunSettings) -> MeDiMOutput:
    """One report per image, starting with its prompt when `prompts` is given (one per image)."""
    pixels, sizes, codes = encode_images(rt, rgb)
    task = tasks.image_to_report(rt.layout, codes)
    if prompts is not None:
        given = prompt_task(rt.layout, rt.tokenizer, prompts, rt.device)
        task = tasks.TaskInputs(torch.where(given.known, given.x, task.x), given.known | task.known)
    condition = rt.layout.condition(rt.tokenizer, sizes)
    tokens, nfe = run_chunks(rt, task, condition, settings)
    return MeDiMOutput(shown_inputs(rgb, pixels, codes, settings.output_type),
                       rt.layout.decode_reports(rt.tokenizer, tokens), tokens, nfe)


def generate_pairs(rt: Runtime, prompts: list[str], image_size: tuple[int, int], settings: RunSettings) -> MeDiMOutput:
    """One image-report pair per prompt (a report beginning, "" for none), generated together."""
    task = prompt_task(rt.layout, rt.tokenizer, prompts, rt.device)
    condition = rt.layout.condition(rt.tokenizer, [image_size] * len(prompts))
    tokens, nfe = run_chunks(rt, task, condition, settings)
    return MeDiMOutput(decode_images(rt, tokens, settings.output_type),
                       rt.layout.decode_reports(rt.tokenizer, tokens), tokens, nfe)

"""What every pipeline task shares: the input checks, the sampler settings of a call, one generator
per output, chunked sampling with a progress bar, and decoding tokens back to images.

The checks run once, at the pipeline's public edge, before any compute; what is below them
(layout, tasks, sampler) takes their output as valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from medim.data.images import postprocess
from medim.diffusion import tasks
from medim.diffusion.config import SamplerConfig
from medim.diffusion.sampler import check_generator, sample

__all__ = ["OUTPUT_TYPES", "check_prompts", "check_image_size", "check_call", "sampler_settings",
           "row_generators", "run_chunks", "prompt_task", "decode_images"]

OUTPUT_TYPES = ("pil", "pt", "tokens")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_prompts(prompts: Any, name: str = "prompts", allow_empty_text: bool = False) -> list[str]:
    """A non-empty list of str (each non-blank unless `allow_empty_text`)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{name} is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(p).__name__}")
        if not allow_empty_text and not p.strip():
            raise ValueError(f"{name}[{i}] is empty")
    return list(prompts)


def check_image_size(image_size: Any) -> tuple[int, int]:
    """(width, height) as positive ints: the size the medim-v1 layout tells the model."""
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(map(_positive_int, image_size))):
        raise ValueError(f"image_size must be (width, height) positive ints, got {image_size!r}")
    return tuple(image_size)


def check_call(rows: int, batch_size: Any, output_type: Any, generator: Any, callback: Any, sampler_kwargs: Any) -> None:
    """The options every task takes, for a call making `rows` outputs (the sampler settings are
    checked by `sampler_settings`)."""
    if batch_size is not None and not _positive_int(batch_size):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    check_generator(generator, rows)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    if sampler_kwargs is not None and not isinstance(sampler_kwargs, Mapping):
        raise TypeError(f"sampler_kwargs must be a dict of sampler options, got {type(sampler_kwargs).__name__}")


def sampler_settings(defaults: SamplerConfig, sampler_kwargs: Mapping[str, Any] | None, **named: Any) -> SamplerConfig:
    """The call's settings: `defaults`, then `sampler_kwargs`, then the named arguments that are
    not None (`num_steps`, `guidance_scale`, ...). Validated here, before any compute."""
    return defaults.replace(**{**(sampler_kwargs or {}), **{k: v for k, v in named.items() if v is not None}})


def row_generators(generator: Any, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per output, so a row's sample does not depend on how outputs are chunked.
    A single generator (or None: torch's global RNG) seeds the per-output ones."""
    if isinstance(generator, (list, tuple)):
        return list(generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (n,), generator=generator, device=gen_device).tolist()
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def prompt_task(layout: Any, tokenizer: Any, prompts: list[str], device: torch.device) -> tasks.TaskInputs:
    """Report beginnings known, everything else unknown. A prompt's tokens are its encoded report
    up to padding or the end-of-report id (which must stay free to move)."""
    ids = layout.encode_reports(tokenizer, prompts)
    real = ids != layout.pad_id
    if layout.report_end_id is not None:
        real &= ids != layout.report_end_id
    lengths = real.long().cumprod(1).sum(1)
    return tasks.pair_from_prompt(layout, ids.to(device), lengths)


def run_chunks(pipe: Any, task: tasks.TaskInputs, condition: dict[str, torch.Tensor], config: SamplerConfig,
               batch_size: int | None, generator: Any, callback: Callable[..., None] | None) -> tuple[torch.Tensor, int]:
    """Sample `task` in chunks of `batch_size` rows with one generator per row; returns the final
    states [B, N] and the network evaluations spent."""
    n = task.x.shape[0]
    size = batch_size or n
    generators = row_generators(generator, n, pipe.device)
    x, known = task.x.to(pipe.device), task.known.to(pipe.device)
    condition = {k: v.to(pipe.device) for k, v in condition.items()}
    chunks = range(0, n, size)
    bar = tqdm(total=len(chunks) * config.num_steps, desc="MeDiM", **pipe._progress_bar_config)

    def denoiser(xt, sigma, positions, **kwargs):
        # Raw logits: the sampler normalises them itself (it is invariant to a per-position
        # constant), so the model's log-softmax over every row would be a wasted pass.
        return pipe.model(xt, sigma, positions=positions, return_logits=True, **kwargs).logits

    def on_step(step: int, t: float, tokens: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback(pipe, step, t, tokens)

    out, nfe = [], 0
    with torch.inference_mode(), bar:
        for start in chunks:
            rows = slice(start, start + size)
            result = sample(denoiser, x[rows], known[rows], segments=pipe.layout.segments, mask_id=pipe.layout.mask_id,
                            config=config, generator=generators[rows],
                            model_kwargs={k: v[rows] for k, v in condition.items()}, callback=on_step)
            out.append(result.tokens)
            nfe += result.nfe
    return torch.cat(out), nfe


def decode_images(pipe: Any, tokens: torch.Tensor, output_type: str, batch_size: int | None) -> list[Image.Image] | torch.Tensor:
    """The image part of final states as `output_type`: VQ codes ("tokens"), [0, 1] pixels ("pt")
    or RGB PIL images ("pil")."""
    image = pipe.layout.image_segment
    codes = tokens[:, image.start : image.stop] - image.vocab_start
    if output_type == "tokens":
        return codes
    pixels = torch.cat([pipe.vqgan.decode(c).float().cpu() for c in codes.split(batch_size or len(codes))])
    return postprocess(pixels) if output_type == "pil" else (pixels + 1) / 2

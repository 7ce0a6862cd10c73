"""Tiny in-memory pipelines for the editing and scoring tests, one per layout: native (text_len 40,
16 px images -> 8 x 8 codes, the phantom word tokenizer) and medim-v1 (text_len 16, 16 px -> 4 x 4
codes, the Llama-style word tokenizer), with random weights and a 4-step sampler."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from medim.layout import MeDiMV1Layout
from medim.pipelines.pipeline import MeDiMPipeline
from tests.helpers.backbone import TINY_BASE_VOCAB, TINY_IMAGE_VOCAB
from tests.helpers.backbone import tiny_tokenizer as v1_tokenizer
from tests.helpers.training import tiny_layout, tiny_pipeline, tiny_tokenizer, tiny_vqgan
from tests.helpers.vqgan import tiny_model

PX = 16


def _pipe(layout, vqgan, tokenizer, seed: int) -> MeDiMPipeline:
    pipe = tiny_pipeline(layout, vqgan, tokenizer, seed,
                         sampler_config={"num_inference_steps": 4, "guidance_scale": 0.0})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_pipe(seed: int = 0) -> MeDiMPipeline:
    return _pipe(tiny_layout(), tiny_vqgan(seed), tiny_tokenizer(), seed)


def v1_pipe(seed: int = 0) -> MeDiMPipeline:
    layout = MeDiMV1Layout(base_vocab_size=TINY_BASE_VOCAB, text_len=16, image_len=16,
                           image_vocab_size=TINY_IMAGE_VOCAB)
    vqgan = tiny_model(seed, resolution=16, ch_mult=(1, 2, 2))  # downsample 4: 16 px -> 4 x 4
    return _pipe(layout, vqgan, v1_tokenizer(TINY_BASE_VOCAB, bos_id=1, eos_id=2), seed)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, seed: int = 0, size: tuple[int, int] = (PX, PX)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def fail_if_called(monkeypatch, pipe: MeDiMPipeline) -> None:
    """Make every model forward and VQGAN encode raise: a check that must run before any compute.
    Set in the instances' __dict__, so the undo leaves a shared pipeline exactly as it was."""

    def boom(*args, **kwargs):
        raise AssertionError("compute ran before the input checks")

    monkeypatch.setitem(vars(pipe.model), "forward", boom)
    monkeypatch.setitem(vars(pipe.vqgan), "encode", boom)

"""Tiny in-memory pipelines for the editing and scoring tests, one per layout: native (text_len 40,
16 px images -> 8 x 8 codes, the phantom word tokenizer) and medim-v1 (text_len 16, 16 px -> 4 x 4
codes, the Llama-style word tokenizer), with random weights and a 4-step sampler."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from medim.layout import MeDiMV1Layout
from medim.models.medim import MeDiMConfig, MeDiMModel
from medim.models.vqgan import VQGAN, VQGANConfig
from medim.pipelines.pipeline import MeDiMPipeline
from tests.helpers.backbone import TINY_BASE_VOCAB, tiny_gemma_config
from tests.helpers.backbone import tiny_tokenizer as v1_tokenizer
from tests.helpers.training import TINY_VQGAN, tiny_layout, tiny_tokenizer, tiny_vqgan

PX = 16


def _pipe(layout, vqgan, tokenizer, seed: int) -> MeDiMPipeline:
    torch.manual_seed(seed)
    model = MeDiMModel(MeDiMConfig(tiny_gemma_config(vocab_size=layout.min_vocab_size), layout=layout.to_dict()))
    pipe = MeDiMPipeline(model, vqgan, tokenizer, sampler_config={"num_inference_steps": 4, "guidance_scale": 0.0})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_pipe(seed: int = 0) -> MeDiMPipeline:
    return _pipe(tiny_layout(), tiny_vqgan(seed), tiny_tokenizer(), seed)


def v1_pipe(seed: int = 0) -> MeDiMPipeline:
    layout = MeDiMV1Layout(base_vocab_size=TINY_BASE_VOCAB, text_len=16, image_len=16,
                           image_vocab_size=TINY_VQGAN["n_embed"])
    torch.manual_seed(seed)
    vqgan = VQGAN(VQGANConfig(**{**TINY_VQGAN, "ch_mult": (1, 2, 2)})).eval()  # downsample 4: 16 px -> 4 x 4
    return _pipe(layout, vqgan, v1_tokenizer(TINY_BASE_VOCAB, bos_id=1, eos_id=2), seed)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, seed: int = 0, size: tuple[int, int] = (PX, PX)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def fail_if_called(monkeypatch, pipe: MeDiMPipeline) -> None:
    """Make every model forward and VQGAN encode raise: a check that must run before any compute."""

    def boom(*args, **kwargs):
        raise AssertionError("compute ran before the input checks")

    monkeypatch.setattr(pipe.model, "forward", boom)
    monkeypatch.setattr(pipe.vqgan, "encode", boom)

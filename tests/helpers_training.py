"""Builders shared by the training-side tests (token cache, trainer, distributed): a word-level
tokenizer over the phantom reports, a tiny VQGAN and native layout, a phantom token cache, and a
saved tiny pipeline + cache + config for the trainer."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from medim.data.cache import build_token_cache
from medim.data.datasets import build_dataset
from medim.data.synthetic import make_dataset
from medim.layout import NativeLayout
from medim.models.vqgan import VQGAN, VQGANConfig
from medim.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
TEXT_VOCAB, IMAGE_VOCAB = 200, 64  # as tests/helpers_backbone.py's tiny Liquid
TINY_VQGAN = dict(ch=32, ch_mult=(1, 2), resolution=16, n_embed=IMAGE_VOCAB, embed_dim=8, z_channels=8,
                  num_res_blocks=1)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the phantom reports' words: <pad>=0 <eos>=1 <bos>=2 <unk>=3."""
    words = sorted({w for _, report, _ in make_dataset(64, seed=0) for w in re.findall(r"\w+|[^\w\s]", report)})
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *words])}
    assert len(vocab) <= TEXT_VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def tiny_layout(text_len: int = 40) -> NativeLayout:
    # 8x8 codes -> 16 px images with the tiny VQGAN (downsample 2).
    return NativeLayout(text_vocab_size=TEXT_VOCAB, image_offset=TEXT_VOCAB, image_vocab_size=IMAGE_VOCAB,
                        mask_id=TEXT_VOCAB + IMAGE_VOCAB, text_len=text_len, image_len=64)


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(**TINY_VQGAN)).eval()


def make_cache(out: Path, n: int = 12, shard_size: int = 5, **kwargs):
    return build_token_cache(build_dataset("phantom", n=n, seed=0, size=32), out, vqgan=tiny_vqgan(),
                             tokenizer=tiny_tokenizer(), layout=tiny_layout(), shard_size=shard_size,
                             batch_size=3, show_progress=False, **kwargs)


def tiny_run(tmp_path: Path, n: int = 24) -> tuple[Path, Path]:
    """A tiny saved pipeline (2-layer Gemma, native layout) and a phantom token cache for it."""
    from helpers_backbone import tiny_gemma_config

    from medim.models.medim import MeDiMConfig, MeDiMModel
    from medim.pipeline import MeDiMPipeline

    base, cache = tmp_path / "base", tmp_path / "cache"
    if not base.exists():
        torch.manual_seed(0)
        layout = tiny_layout()
        model = MeDiMModel(MeDiMConfig(tiny_gemma_config(vocab_size=layout.min_vocab_size), layout=layout.to_dict()))
        MeDiMPipeline(model, tiny_vqgan(), tiny_tokenizer()).save_pretrained(base)
        make_cache(cache, n=n, shard_size=8)
    return base, cache


def tiny_config(tmp_path: Path, out: str, *overrides: str):
    base, cache = tiny_run(tmp_path)
    return load_config(REPO / "configs/tiny.yaml", [
        f"model.init={base}", f"data.cache={cache}", f"train.output_dir={tmp_path / out}", *overrides])

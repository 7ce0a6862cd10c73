"""Builders shared by the training-side tests (token cache, trainer, distributed): a word-level
tokenizer over the phantom reports, a tiny VQGAN and native layout, a random tiny pipeline, a phantom
token cache, a saved tiny pipeline + cache + config for the trainer, a counter of host-syncing
operations, and the exit of a spawned rank."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from transformers import PreTrainedTokenizerFast

from medim.data.cache import build_token_cache
from medim.data.datasets import build_dataset
from medim.data.synthetic import make_dataset
from medim.layout import NativeLayout
from medim.models.medim import MeDiMConfig, MeDiMModel
from medim.models.vqgan import VQGAN
from medim.pipelines.pipeline import MeDiMPipeline
from medim.training.config import load_config
from tests.helpers.backbone import tiny_gemma_config
from tests.helpers.vqgan import tiny_model

REPO = Path(__file__).resolve().parents[2]
TEXT_VOCAB, IMAGE_VOCAB = 200, 64  # as tests/helpers/backbone.py's tiny Liquid


@functools.cache
def _phantom_words() -> tuple[str, ...]:
    # Drawing the 64 phantoms is the slow part of a tokenizer: done once per process.
    return tuple(sorted({w for _, report, _ in make_dataset(64, seed=0) for w in re.findall(r"\w+|[^\w\s]", report)}))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the phantom reports' words: <pad>=0 <eos>=1 <bos>=2 <unk>=3.
    (tests/helpers/backbone.py's `tiny_tokenizer` is the other kind: Llama-style, fixed words, BOS added.)"""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *_phantom_words()])}
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
    """tests/helpers/vqgan.py's tiny VQGAN for 16 px images (downsample 2: 8 x 8 codes)."""
    return tiny_model(seed, resolution=16)


def tiny_pipeline(layout, vqgan: VQGAN, tokenizer, seed: int = 0, **pipeline_kwargs) -> MeDiMPipeline:
    """A pipeline around a random 2-layer Gemma MeDiM over `layout`, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    model = MeDiMModel(MeDiMConfig(tiny_gemma_config(vocab_size=layout.min_vocab_size), layout=layout.to_dict()))
    return MeDiMPipeline(model, vqgan, tokenizer, **pipeline_kwargs)


def make_cache(out: Path, n: int = 12, shard_size: int = 5, **kwargs):
    return build_token_cache(build_dataset("phantom", n=n, seed=0, size=32), out, vqgan=tiny_vqgan(),
                             tokenizer=tiny_tokenizer(), layout=tiny_layout(), shard_size=shard_size,
                             batch_size=3, show_progress=False, **kwargs)


def tiny_run(tmp_path: Path, n: int = 24) -> tuple[Path, Path]:
    """A tiny saved pipeline (2-layer Gemma, native layout) and a phantom token cache for it, built
    unless `tmp_path` holds them already (conftest's `tiny_run_copy` puts a copy there)."""
    base, cache = tmp_path / "base", tmp_path / "cache"
    if not base.exists():
        tiny_pipeline(tiny_layout(), tiny_vqgan(), tiny_tokenizer()).save_pretrained(base)
        make_cache(cache, n=n, shard_size=8)
    return base, cache


def tiny_config(tmp_path: Path, out: str, *overrides: str):
    base, cache = tiny_run(tmp_path)
    return load_config(REPO / "configs/tiny.yaml", [
        f"model.init={base}", f"data.cache={cache}", f"train.output_dir={tmp_path / out}", *overrides])


class HostSyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for an accelerator (found on CPU too, where
    they would be free): reading a value (`.item()`, `float()`, `bool()`, `int()` all reach
    `_local_scalar_dense`), data-dependent shapes (nonzero, masked_select, bool-mask indexing),
    `equal`; plus `Tensor.tolist()` / `.numpy()`, which bypass dispatch. `calls` lists them."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2",
               "unique_consecutive", "unique_dim")

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in self.SYNCING or bool_index:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patched = {m: getattr(torch.Tensor, m) for m in ("tolist", "numpy")}
        for m, original in self._patched.items():
            setattr(torch.Tensor, m, self._counting(m, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for m, original in self._patched.items():
            setattr(torch.Tensor, m, original)
        return super().__exit__(*exc)

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            if _get_current_dispatch_mode() is self:  # not while the mode is set aside
                self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return method


def assert_same_tensors(a: Path, b: Path, files: list[str]) -> None:
    """The safetensors files `files` (relative paths) of runs `a` and `b` hold the same tensors, bit for bit
    (a run killed and resumed against one that was not)."""
    from safetensors.torch import load_file

    for rel in files:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel


def leave_worker() -> None:
    """End a spawned rank whose results are on disk: leave the process group, then exit without the
    interpreter's teardown, as `medim train` does and for the same reason
    (`medim.commands.common.finish_training_run`: gloo's threads abort a process that tears down
    while they free a finished collective's tensors; a core dump showed ProcessGroupGloo::runLoop ->
    ~AsyncBroadcastWork -> THPVariable_dealloc -> take_gil)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    os._exit(0)

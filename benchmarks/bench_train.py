"""Training throughput through medim's Trainer: tokens/s, MFU and peak memory per configuration.

    python benchmarks/bench_train.py                                  # CPU rehearsal, tiny width
    python benchmarks/bench_train.py --size liquid --device cuda      # the 3.5 B shape, every configuration

Each row builds a fresh random-weight MeDiM in the medim-v1 shape (256 + 1024 tokens) and trains
it with `medim.training.Trainer` on random tokens held in memory: the loop of a real run (fused
AdamW, the non-finite guard, the LR table, no host sync per step), without a token cache or
checkpoints. A row is `CONFIG@MICRO_BATCH` (one micro-batch per step, one process):
  plain            the trainer as configured by --precision (bf16: autocast, fp32 master weights)
  ckpt             + activation checkpointing (frees memory for a larger micro-batch)
  compile          + train.compile (the transformer block compiled once, reused by every layer)
  ckpt+compile     both
  fsdp+ckpt+compile  FSDP2 on a one-member group: under bf16 its MixedPrecisionPolicy
Timed: --steps optimizer steps after --warmup steps (compilation, allocator), between two of the
trainer's boundary reads. MFU = model FLOPs of forward + backward (3 x the forward's; checkpointing's
recomputation not counted) / time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SIZES,
    forward_flops,
    machine_info,
    medim_v1_model,
    peak_memory,
    report,
    reset_peak_memory,
    text_to_image_batch,
)

CONFIGS = {
    "plain": [],
    "ckpt": ["model.gradient_checkpointing=true"],
    "compile": ["train.compile=true"],
    "ckpt+compile": ["model.gradient_checkpointing=true", "train.compile=true"],
    "fsdp+ckpt+compile": ["train.parallel=fsdp", "model.gradient_checkpointing=true", "train.compile=true"],
}
DEFAULT_ROWS = {"cuda": "plain@4,ckpt@4,ckpt@16,compile@4,ckpt+compile@16,fsdp+ckpt+compile@16",
                "cpu": "plain@2,ckpt@2,compile@2,fsdp+ckpt+compile@2"}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class RandomTokens:
    """Random training items in a layout, as `TokenCacheDataset.batch` returns them: reports of
    60-200 tokens (right-padded), random image codes, 512 x 512 sizes."""

    def __init__(self, layout, n: int = 64, seed: int = 0):
        self.layout = layout
        x0, _, _ = text_to_image_batch(layout, n, seed=seed)
        g = torch.Generator().manual_seed(seed)
        x0[:, layout.text_len:] = torch.randint(0, layout.image_vocab_size, (n, layout.image_len), generator=g
                                                ) + layout.image_segment.vocab_start
        self.x0 = x0

    def __len__(self) -> int:
        return len(self.x0)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"x0": self.x0[indices], "sizes": torch.tensor([[512, 512]] * len(indices)),
                "prefix_len": torch.zeros(len(indices), dtype=torch.long)}


def random_pipeline(size: str, device: torch.device, **shape):
    """A MeDiMPipeline around a random medim-v1 model: the VQGAN is never run in training, and a
    word-level tokenizer stands in for Llama-2's to tokenise the size string (15 ids, not 24)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medim.models.vqgan import VQGAN, VQGANConfig
    from medim.pipelines.pipeline import MeDiMPipeline

    model = medim_v1_model(size, device=device, **shape)
    words = re.findall(r"\w+|[^\w\s]", model.layout.size_string(512, 512))
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    side = int(model.layout.image_len ** 0.5)
    vqgan = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1), resolution=2 * side, n_embed=model.layout.image_vocab_size,
                              embed_dim=4, z_channels=32, num_res_blocks=1))
    return MeDiMPipeline(model, vqgan, tokenizer)


def train_flops(pipe, batch: int) -> float:
    """Model FLOPs of one training step on `batch` rows: forward + backward = 3 x the forward, every
    position of both segments read out (as the loss asks)."""
    layout = pipe.layout
    x, _, _ = text_to_image_batch(layout, 1)
    keys = layout.backbone_inputs(x, **layout.condition(pipe.tokenizer, [(512, 512)])).input_ids.shape[1]
    return 3 * forward_flops(pipe.model, batch, keys, keys, {s.name: s.length for s in layout.segments})


def train_rate(size: str, device: torch.device, config: str, batch: int, precision: str, steps: int,
               warmup: int, **shape) -> dict[str, Any]:
    """One row: tokens/s, s/step, MFU and peak memory of the trainer under `config` at `batch`."""
    from medim.training import Trainer, load_config

    base = reset_peak_memory(device)
    pipe = random_pipeline(size, device, **shape)
    flops, state_len = train_flops(pipe, batch), pipe.layout.state_len
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            f"model.init=random {size} weights", "data.cache=random tokens in memory", f"train.output_dir={out}",
            f"train.max_steps={warmup + steps + 1}", f"train.global_batch_size={batch}",
            f"train.micro_batch_size={batch}", f"train.precision={precision}", f"train.device={device}",
            "train.parallel=none", "optim.scheduler=constant_with_warmup", "optim.warmup_steps=0",
            "log.every=1000000", "eval.every=0", "checkpoint.every=0", *CONFIGS[config]])
        trainer = Trainer(cfg, pipeline=pipe, dataset=RandomTokens(pipe.layout, n=max(64, 2 * batch)))
        start = time.perf_counter()
        trainer.fit(until_step=warmup)  # ends with a host read: the device is idle
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        trainer.fit(until_step=warmup + steps)
        seconds = (time.perf_counter() - start) / steps
        loss = trainer.history[-1]["loss"]
    peak = peak_memory(device)
    del trainer, pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak_hw = peak_flops(device)
    return dict(config=config, batch=batch, tokens_per_s=batch * state_len / seconds,
                s_per_step=seconds, TFLOPs=flops / seconds / 1e12, MFU=flops / seconds / peak_hw if peak_hw else None,
                warmup_s=warm_s, peak_GiB=peak / 2**30, peak_minus_start_GiB=(peak - base) / 2**30, loss=loss,
                error="")


ROW_KEYS = ("config", "batch", "tokens_per_s", "s_per_step", "TFLOPs", "MFU", "warmup_s", "peak_GiB",
            "peak_minus_start_GiB", "loss", "error")


def parse_rows(text: str) -> list[tuple[str, int]]:
    rows = []
    for item in filter(None, text.split(",")):
        name, _, batch = item.partition("@")
        if name not in CONFIGS or not batch.isdigit() or int(batch) < 1:
            raise SystemExit(f"--rows: {item!r} is not CONFIG@MICRO_BATCH with CONFIG one of {list(CONFIGS)}")
        rows.append((name, int(batch)))
    return rows


def run_rows(rows: list[tuple[str, int]], size: str, device: torch.device, precision: str, steps: int, warmup: int,
             log=print, **shape) -> list[dict[str, Any]]:
    """Every row in turn; a row that fails (e.g. out of memory) is reported, the others still run."""
    results = []
    for config, batch in rows:
        log(f"  training {config} @ micro-batch {batch}")
        try:
            results.append(train_rate(size, device, config, batch, precision, steps, warmup, **shape))
        except Exception as e:  # one configuration must not lose the others
            results.append(dict.fromkeys(ROW_KEYS) | dict(config=config, batch=batch,
                                                          error=f"{type(e).__name__}: {str(e)[:200]}"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"  -> {results[-1]}")
    if torch.distributed.is_initialized():  # the fsdp rows' one-member group
        torch.distributed.destroy_process_group()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--rows", default=None, help=f"comma list of CONFIG@MICRO_BATCH; CONFIG in {list(CONFIGS)} "
                   f"(default on cuda: {DEFAULT_ROWS['cuda']})")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    rows = parse_rows(args.rows or DEFAULT_ROWS["cuda" if device.type == "cuda" else "cpu"])
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = run_rows(rows, args.size, device, precision, args.steps, args.warmup)
    report(f"Training throughput through the Trainer ({args.size}, {args.device}, {precision})",
           dict(size=args.size, precision=precision, steps=args.steps, warmup=args.warmup, optimizer="fused AdamW",
                layout="medim-v1 256+1024", data="random tokens in memory"),
           results, machine_info(device),
           ["tokens/s counts the 1280 state tokens of each row; MFU against the dense bf16 peak (none on CPU)",
            "CPU peak = resident-set high-water mark of the process since the row started"],
           results=None if args.no_record else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

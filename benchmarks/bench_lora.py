"""Memory of LoRA against full fine-tuning through medim's Trainer, in bf16 (autocast, fp32 master weights).

    python benchmarks/bench_lora.py          # CPU: the real medim-v1 width, 1 and 2 layers, extrapolated to 10
    python benchmarks/bench_lora.py --gpu    # CUDA: the whole 10-layer medim-v1 shape

Each row trains a random-weight MeDiM in the medim-v1 shape (256 report + 1024 image tokens, the
release's 40196-row vocabulary, Liquid's 3072-wide layers) on random tokens in memory, micro-batch 1
by default, and reports the trainable weights, the AdamW state (bytes of its tensors), the peak
memory (CUDA: allocated; CPU: the resident-set high-water mark of a fresh process per row) and
tokens/s. Configurations: `full` or `lora` (r=16 on the default targets: attention, MLP, AdaLN),
each with and without gradient checkpointing (`+ckpt`).

On CPU 10 layers of full fine-tuning do not fit a shared 24 GB machine, so rows run 1 and 2 layers
of the real width and the 10-layer peak is extrapolated linearly: peak(10) = peak(1) + 9 * (peak(2) -
peak(1)); full fine-tuning is measured at 1 layer and its per-layer step is LoRA's plus the 12 bytes
per weight that full training adds (fp32 gradient + two AdamW moments). Trainable counts for 10
layers are exact (the model built on the meta device).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import RandomTokens, random_pipeline  # noqa: E402
from common import RESULTS, machine_info, medim_v1_model, peak_memory, report, reset_peak_memory  # noqa: E402

CONFIGS = {"full": [], "full+ckpt": ["model.gradient_checkpointing=true"], "lora": ["lora.r=16", "lora.alpha=16"],
           "lora+ckpt": ["lora.r=16", "lora.alpha=16", "model.gradient_checkpointing=true"]}
GIB = 2**30
ROW_KEYS = ("config", "layers", "batch", "trainable", "total", "trainable_pct", "adam_GiB", "peak_GiB",
            "peak_minus_start_GiB", "per_layer_GiB", "tokens_per_s", "s_per_step", "error")


def run_row(config: str, layers: int, device: torch.device, batch: int, steps: int,
            size: str = "liquid") -> dict[str, Any]:
    """Train `steps` steps (the first one untimed unless it is the only one) and measure (`size`:
    a width of common.SIZES; "tiny" rehearses on CPU)."""
    from medim.training import Trainer, load_config

    base = reset_peak_memory(device)
    pipe = random_pipeline(size, device, num_layers=layers)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            "model.init=random liquid-width weights", "data.cache=random tokens in memory", f"train.output_dir={out}",
            f"train.max_steps={steps + 1}", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}",
            "train.precision=bf16", f"train.device={device}", "train.parallel=none", "optim.warmup_steps=0",
            "optim.scheduler=constant_with_warmup", "log.every=1000000", "eval.every=0", "checkpoint.every=0",
            *CONFIGS[config]])
        trainer = Trainer(cfg, pipeline=pipe, dataset=RandomTokens(pipe.layout, n=max(8, 2 * batch)))
        start = time.perf_counter()
        trainer.fit(until_step=1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        if steps > 1:
            trainer.fit(until_step=steps)
        seconds = (time.perf_counter() - start) / (steps - 1) if steps > 1 else first
        params = list(trainer.model.parameters())
        adam = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                   if torch.is_tensor(t))
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
    return dict(config=config, layers=layers, batch=batch, trainable=trainable, total=total,
                trainable_pct=100 * trainable / total, adam_GiB=adam / GIB, peak_GiB=peak_memory(device) / GIB,
                peak_minus_start_GiB=(peak_memory(device) - base) / GIB,
                tokens_per_s=batch * pipe.layout.state_len / seconds, s_per_step=seconds)


def counts_at_10_layers() -> dict[str, tuple[int, int]]:
    """Exact (trainable, total) weights of the 10-layer medim-v1 shape, full and LoRA r=16."""
    from medim.training.config import LoraSection
    from medim.training.lora import apply_lora, peft_config

    with torch.device("meta"):
        model = medim_v1_model("liquid", device="meta")
    total = sum(p.numel() for p in model.parameters())
    adaln = sum(p.numel() for layer in model.layers for p in layer.adaLN_modulation.parameters())
    trainable = apply_lora(model, peft_config(LoraSection(r=16, alpha=16), tokenizer=None))  # no token rows
    with_adapters = sum(p.numel() for p in model.parameters())
    return {"full": (total, total), "lora": (trainable, with_adapters), "adaln": (adaln, total)}


def child(config: str, layers: int, device: str, batch: int, steps: int) -> dict[str, Any]:
    """One row in a fresh process: the CPU peak is then this row's alone."""
    cmd = [sys.executable, __file__, "--row", config, str(layers), device, str(batch), str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        return dict(config=config, layers=layers, batch=batch, error=run.stderr.strip().splitlines()[-1][:200])
    return json.loads(run.stdout.strip().splitlines()[-1])


def extrapolate(rows: list[dict[str, Any]], counts: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """10-layer peaks from the 1- and 2-layer rows (module docstring)."""
    by = {(r["config"], r["layers"]): r for r in rows if "peak_GiB" in r}
    layer_weights = (counts["full"][0] - by[("full", 1)]["total"]) / 9 if ("full", 1) in by else None
    out = []
    for config in CONFIGS:
        lora_config = config.replace("full", "lora")
        one, two = by.get((config, 1)), by.get((lora_config, 2))
        if one is None or two is None or (lora_config, 1) not in by:
            continue
        step = two["peak_GiB"] - by[(lora_config, 1)]["peak_GiB"]
        if config.startswith("full"):
            step += 12 * layer_weights / GIB
        trainable, total = counts["full" if config.startswith("full") else "lora"]
        out.append(dict(config=config, layers="10 (extrapolated)", batch=one["batch"], trainable=trainable,
                        total=total, trainable_pct=100 * trainable / total, adam_GiB=8 * trainable / GIB,
                        peak_GiB=one["peak_GiB"] + 9 * step, per_layer_GiB=step))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the 10-layer model on CUDA (default: CPU, 1-2 layers)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch (default 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per row (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--row", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.row:
        config, layers, device, batch, steps = args.row
        print(json.dumps(run_row(config, int(layers), torch.device(device), int(batch), int(steps))))
        return 0
    device = "cuda" if args.gpu else "cpu"
    steps = args.steps or (4 if args.gpu else 1)
    plan = ([(c, 10) for c in CONFIGS] if args.gpu
            else [("lora", 1), ("lora", 2), ("lora+ckpt", 1), ("lora+ckpt", 2), ("full", 1), ("full+ckpt", 1)])
    rows = []
    for config, layers in plan:
        print(f"  {config} x {layers} layers", flush=True)
        rows.append(child(config, layers, device, args.batch, steps))
        print(f"  -> {rows[-1]}", flush=True)
    counts = counts_at_10_layers()
    if not args.gpu:
        rows += extrapolate(rows, counts)
    notes = [f"AdaLN modulation: {counts['adaln'][0] / 1e6:.0f} M of {counts['adaln'][1] / 1e6:.0f} M weights "
             f"({100 * counts['adaln'][0] / counts['adaln'][1]:.1f} %)",
             "peak: CUDA allocated / CPU resident-set high-water mark of a fresh process per row",
             "adam_GiB: AdamW's two fp32 moments of the trainable weights (extrapolated rows: 8 bytes x trainable)"]
    if not args.gpu:
        notes.append("10-layer rows: peak(1) + 9 x per-layer step; the step is LoRA's measured 2-layer minus 1-layer "
                     "peak, plus 12 bytes per layer weight for full fine-tuning (fp32 gradient + two AdamW moments)")
    rows = [{k: row.get(k, "") for k in ROW_KEYS} for row in rows]
    report(f"LoRA vs full fine-tuning memory (medim-v1 shape, bf16, {device}, micro-batch {args.batch})",
           dict(device=device, batch=args.batch, steps=steps, lora="r=16 alpha=16, default targets"), rows,
           machine_info(device), notes, results=None if args.no_record else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-shot check on a CUDA machine (H100/H200), in one call of under ten minutes:

    pip install -e . && python benchmarks/gpu_check.py            # results in $OUT (default ./gpu_out)
    python benchmarks/gpu_check.py --tiny                         # everything shrunk (CPU rehearsal)
    python benchmarks/gpu_check.py --skip precision,sampling --train-rows plain@4,ckpt@16

Sections, most wanted first, each guarded so one failure does not lose the rest (results are
rewritten after each), on random weights in the Liquid shape (hidden 3072, 10 layers, 16 x 256
heads, intermediate 24576, vocab 40196, medim-v1 256 + 1024 tokens):
1. training: the 3.5 B shape through medim's Trainer (benchmarks/bench_train.py): tokens/s, MFU
   and peak memory per row CONFIG@MICRO_BATCH (--train-rows; default: checkpointing at 4,
   checkpointing + compiled blocks at 16, and the same under one-rank FSDP2 mixed precision).
2. compile: text-to-image with the compiled denoiser (`pipe.compile()`'s path) against eager, with
   torch.compile's default mode and with "reduce-overhead" (CUDA graphs): s/step, compile time,
   token agreement (benchmarks/bench_sampler.py (e)).
3. caching: seconds and FLOPs per sample of the three tasks with context caching at intervals 2
   and 4 against uncached, 32 guided steps (bench_sampler.py (d)).
4. lora: LoRA (r=16) training memory and tokens/s at the whole 10-layer shape, with and without
   checkpointing (benchmarks/bench_lora.py's rows; full fine-tuning is section 1).
5. distill: what `medim distill` costs at this shape: the teacher writing reports (method
   `sequence`, one forward per report position, guided as medim-v1 samples) in reports/s, and
   pairs/s of a 4-step unguided student against the teacher's 32 guided steps.
6. precision: bf16 against float32 log-probs.
7. sampling: guided text-to-image at batch 8 and 32 (16 steps measured): per-step time, images/s
   extrapolated to 128 steps (stated as such), loop overhead, MFU; the release-style loop on 2 rows.
Writes $OUT/gpu_check.md and $OUT/gpu_check.json and prints progress with timestamps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import run_row as lora_row  # noqa: E402
from bench_sampler import cache_speed, compile_speed, loop_overhead, release_speedup, sample_task  # noqa: E402
from bench_train import parse_rows, peak_flops, run_rows  # noqa: E402
from common import machine_info, markdown_table, medim_v1_model, task_batch, text_to_image_batch, timed  # noqa: E402

from medim.models.denoiser import ModelDenoiser  # noqa: E402
from medim.training.sequence import shared_noise, write_reports  # noqa: E402
from medim.utils.hub import atomic_file  # noqa: E402

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def forward_flops(model, rows: int, image_positions: int) -> float:
    """Matmul FLOPs of one forward of `rows` sequences: 2 x weights x tokens for the blocks, the
    attention scores and values (4 x L^2 x heads x head_dim per layer) and the image head."""
    cfg = model.config.backbone_config
    layout = model.layout
    L = layout.text_len + layout.image_len + 3 + 24  # + <boi> <eoi> <eos> and the size string
    block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
    attn = 4 * L * L * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    head = 2 * image_positions * layout.image_vocab_size * cfg.hidden_size
    return rows * (2 * block * L + attn + head)


def section_precision(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model32 = medim_v1_model(a.size, device=device, **a.shape)
    x, known, cond = text_to_image_batch(model32.layout, 2, device, cond_len=a.cond_len)
    sigma = torch.tensor([1.0, 0.3], device=device)
    with torch.inference_mode():
        ref = model32(x, sigma, **cond).logprobs["image"]
        model16 = model32.to(torch.bfloat16)  # in place: the float32 copy is no longer needed
        got = model16(x, sigma, **cond).logprobs["image"]
    diff = (got - ref).abs()
    return dict(max_abs_logprob_diff=float(diff.max()), mean_abs_logprob_diff=float(diff.mean()),
                argmax_agreement=float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                output_dtype=str(got.dtype))


def section_sampling(a: argparse.Namespace, device: torch.device, model) -> list[dict[str, Any]]:
    rows = []
    for batch in a.batches:
        log(f"  sampling: batch {batch}, {a.steps} steps, guidance {a.guidance}")
        r = loop_overhead(model, batch, a.steps, a.guidance, repeats=1)
        per_step = r["sample_s"] / a.steps
        flops = (r["nfe"] - 1) * forward_flops(model, 2 * batch, model.layout.image_len) + forward_flops(
            model, batch, model.layout.image_len)
        peak = peak_flops(device)
        row = dict(batch=batch, steps_measured=a.steps, s_per_step=per_step, loop_overhead=r["loop_overhead"],
                   images_per_s_at_128_steps_extrapolated=batch / (per_step * 128),
                   model_TFLOPs=flops / r["sample_s"] / 1e12,
                   MFU=flops / r["sample_s"] / peak if peak else None)
        if batch == a.batches[0]:
            log("  release-style loop on 2 rows")
            rel = release_speedup(model, r, min(2, batch), a.guidance)
            row.update(speedup_vs_release=rel["speedup"], release_token_agreement=rel["token_agreement"])
        rows.append(row)
        del r
        gc.collect()
    return rows


def section_training(a: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    precision = "bf16" if device.type == "cuda" else "fp32"
    return run_rows(a.train_rows, a.size, device, precision, steps=a.train_steps, warmup=2, log=log, **a.shape)


def section_compile(a: argparse.Namespace, device: torch.device, model) -> list[dict[str, Any]]:
    modes = (None, "reduce-overhead") if device.type == "cuda" else (None,)  # CUDA graphs need CUDA
    return [compile_speed(model, a.batches[0], a.compile_steps, a.guidance, mode) for mode in modes]


def section_caching(a: argparse.Namespace, device: torch.device, model) -> list[dict[str, Any]]:
    return cache_speed(model, ["pairs", "image_to_report", "text_to_image"], a.batches[0], a.cache_steps,
                       a.guidance, [2, 4])


def section_lora(a: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    return [lora_row(config, a.lora_layers, device, batch=1, steps=a.train_steps + 1, size=a.size)
            for config in ("lora", "lora+ckpt")]


@torch.inference_mode()
def section_distill(a: argparse.Namespace, device: torch.device, model) -> list[dict[str, Any]]:
    layout, batch = model.layout, a.batches[0]
    x, _, cond = task_batch(layout, "image_to_report", batch, device, cond_len=a.cond_len)  # random codes
    image = layout.image_segment
    codes = x[:, image.start : image.stop] - image.vocab_start
    noise = shared_noise(layout.text_len, layout.text_segment.vocab_size, seed=0)
    seconds, _ = timed(lambda: write_reports(model, codes, noise, 0.5, guidance_scale=a.guidance, **cond), device)
    rows = [dict(what="teacher writes reports (sequence targets)", batch=batch, nfe=layout.text_len,
                 seconds=seconds, per_s=batch / seconds, unit="reports")]
    pairs = task_batch(layout, "pairs", batch, device, cond_len=a.cond_len)
    for what, steps, guidance, options in (("teacher pairs, 32 guided steps", 32, a.guidance, {}),
                                           ("student pairs, 4 unguided steps (text first)", 4, 0.0,
                                            dict(order="text_first", schedule="cosine_ratio"))):
        seconds, out = timed(partial(sample_task, ModelDenoiser(model), model, pairs, steps, guidance, **options),
                             device)
        rows.append(dict(what=what, batch=batch, nfe=out.nfe, seconds=seconds, per_s=batch / seconds,
                         unit="pairs"))
    return rows


def write(out_dir: Path, results: dict[str, Any]) -> None:
    """Rewrite both files (atomically) with everything gathered so far."""
    with atomic_file(out_dir / "gpu_check.json") as f:
        json.dump(results, f, indent=2, default=str)
    lines = ["# medim gpu_check\n", f"- machine: {json.dumps(results['machine'])}\n",
             f"- settings: {json.dumps(results['settings'])}\n"]
    for name, value in results["sections"].items():
        lines.append(f"\n## {name}\n\n")
        if isinstance(value, dict) and "error" in value:
            lines.append(f"FAILED: {value['error']}\n\n```\n{value['traceback']}\n```\n")
        else:
            lines.append(markdown_table(value if isinstance(value, list) else [value]))
    lines.append("\nimages/s at 128 steps are extrapolated from the measured per-step time "
                 f"({results['settings']['steps']} steps measured).\n")
    with atomic_file(out_dir / "gpu_check.md") as f:
        f.write("".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="shrink everything (runs on CPU)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: training,compile,caching,lora,distill,"
                   "precision,sampling")
    p.add_argument("--train-rows", default=None, help="training rows CONFIG@MICRO_BATCH (see bench_train.py)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.tiny:
        raise SystemExit("gpu_check needs a CUDA device (use --tiny for a CPU smoke test)")
    if a.tiny:
        a.size, a.shape, a.cond_len = "tiny", dict(text_len=16, image_len=64, base_vocab=120, image_vocab=64), 5
        a.batches, a.steps, a.train_steps, a.compile_steps = [2, 4], 4, 2, 2
        a.cache_steps, a.lora_layers = 4, 2
        a.train_rows = parse_rows(a.train_rows or "plain@2,ckpt+compile@2")
    else:
        a.size, a.shape, a.cond_len = "liquid", {}, 24
        a.batches, a.steps, a.train_steps, a.compile_steps = [8, 32], 16, 3, 8
        a.cache_steps, a.lora_layers = 32, 10
        a.train_rows = parse_rows(a.train_rows or "ckpt@4,ckpt+compile@16,fsdp+ckpt+compile@16")
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 reference and head matmuls
    a.guidance = 5.0
    out_dir = Path(os.environ.get("OUT", "./gpu_out"))
    skip = set(filter(None, a.skip.split(",")))
    results: dict[str, Any] = dict(machine=machine_info(device), sections={},
                                   settings=dict(size=a.size, batches=a.batches, steps=a.steps, guidance=a.guidance,
                                                 train_rows=a.train_rows, layout="medim-v1", shape=a.shape))
    log(f"device {results['machine'].get('gpu', 'cpu')}, torch {torch.__version__}, writing to {out_dir}")

    def guarded(name: str, fn) -> None:
        if name in skip:
            return
        log(f"{name} ...")
        try:
            results["sections"][name] = fn()
            log(f"{name} done: {json.dumps(results['sections'][name], default=str)[:400]}")
        except Exception as e:  # one failure must not lose the other sections
            results["sections"][name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            log(f"{name} FAILED: {type(e).__name__}: {e}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(out_dir, results)

    def bf16_model():
        return medim_v1_model(a.size, dtype=torch.bfloat16, device=device, **a.shape)

    # Each section builds its own model and drops it; training first, while the card is empty.
    guarded("training", lambda: section_training(a, device))
    guarded("compile", lambda: section_compile(a, device, bf16_model()))
    guarded("caching", lambda: section_caching(a, device, bf16_model()))
    guarded("lora", lambda: section_lora(a, device))
    guarded("distill", lambda: section_distill(a, device, bf16_model()))
    guarded("precision", lambda: section_precision(a, device))
    guarded("sampling", lambda: section_sampling(a, device, bf16_model()))
    log(f"all done in {time.perf_counter() - START:.0f}s: {out_dir / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

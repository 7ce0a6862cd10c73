"""Sampling cost of a random-weight MeDiM in the medim-v1 shape (256 text + 1024 image tokens,
40196-row vocabulary), text-to-image with classifier-free guidance.

    python benchmarks/bench_sampler.py                                   # CPU, tiny width
    python benchmarks/bench_sampler.py --size liquid --device cuda --dtype bfloat16 --num-inference-steps 16
    python benchmarks/bench_sampler.py --demo-model medim-demo           # + demo accuracies
    python benchmarks/bench_sampler.py --cache-speed --size medium --num-inference-steps 32   # (d) context caching
    python benchmarks/bench_sampler.py --compile-speed                                        # (e) compiled vs eager
    python benchmarks/bench_sampler.py --compile-speed --size liquid --device cuda --dtype bfloat16 \
        --compile-mode reduce-overhead --num-inference-steps 16                               # (e) on a GPU

a) loop overhead = sampling time / (forwards x time of one bare model forward at the same batch
   and positions): 1.0 means the loop costs nothing beyond the network. The bare forward is the
   one a user calls (log-probs); the sampler, like the pipeline, asks for raw logits and
   normalises them itself, so the log-softmax the denominator includes is work it never does.
b) speed-up over the release-style loop (one sample at a time, guidance as a second forward,
   full-vocabulary logits everywhere; `common.release_style_sample`), which draws the same random
   numbers, so both give the same tokens up to float rounding (token_agreement).
c) forwards (NFE) and time per pair for maskgit at 128 / 64 / 32 steps and for threshold; with
   `--demo-model` also the phantom demo's accuracies at each setting (quality per cost).
d) `--cache-speed`: seconds per sample and network FLOPs per step (computed from the shapes:
   common.forward_flops) of each task at `--intervals` of context caching against uncached, with
   the share of tokens equal to the uncached ones (random weights: only cost is meaningful here;
   quality is benchmarks/bench_quality.py's). Only (d) and (e) run when asked for.
e) `--compile-speed`: seconds per step of the compiled denoiser (`ModelDenoiser.compile`, as
   `pipe.compile()`) against eager, the compile time and the token agreement.
Results are printed and appended to benchmarks/RESULTS.md (`--no-record` to skip).
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SIZES,
    FlopMeter,
    machine_info,
    medim_v1_model,
    release_style_sample,
    report,
    task_batch,
    text_to_image_batch,
    timed,
)

from medim.diffusion.sampler import sample  # noqa: E402
from medim.models.denoiser import COMPILE_MODES, ModelDenoiser  # noqa: E402

logger = logging.getLogger("bench_sampler")


def make_denoiser(model):
    """The pipeline's denoiser: raw logits (the sampler normalises them; see `sample`)."""

    def denoiser(x, sigma, positions, **kwargs):
        return model(x, sigma, positions=positions, return_logits=True, **kwargs).logits

    return denoiser


def run_sampler(model, x, known, cond, steps: int, guidance: float, strategy: str = "maskgit", seed: int = 0):
    layout = model.layout
    gens = [torch.Generator(x.device).manual_seed(seed + r) for r in range(x.shape[0])]
    return sample(make_denoiser(model), x, known, segments=layout.segments, mask_id=layout.mask_id,
                  num_inference_steps=steps, strategy=strategy, guidance_scale=guidance, generator=gens,
                  model_kwargs=cond)


def best_of(fn, device, repeats: int) -> tuple[float, Any]:
    """Fastest of `repeats` timed calls (the machine may be shared: the minimum is the least disturbed)."""
    runs = [timed(fn, device) for _ in range(repeats)]
    return min(t for t, _ in runs), runs[-1][1]


@torch.inference_mode()
def loop_overhead(model, batch: int, steps: int, guidance: float, repeats: int = 2) -> dict[str, Any]:
    """(a) sampling time against NFE x the bare forward at the same batch and positions."""
    device = model.device
    x, known, cond = text_to_image_batch(model.layout, batch, device)
    image = model.layout.image_segment
    positions = {"image": torch.arange(image.start, image.stop, device=device)}
    run_sampler(model, x, known, cond, 2, guidance)  # warm-up (allocator, kernels, compile)
    t_sample, out = best_of(lambda: run_sampler(model, x, known, cond, steps, guidance), device, repeats)
    # The first step (t = 1) is unguided (w = guidance * (1 - t) = 0): one forward of B rows.
    guided = out.nfe - 1 if guidance > 0 else 0
    sigma = torch.ones(batch, device=device)
    doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
    fwd_b, _ = best_of(lambda: model(x, sigma, positions=positions, **cond), device, repeats + 1)
    fwd_2b = 0.0
    if guided:
        fwd_2b, _ = best_of(lambda: model(torch.cat([x, x]), torch.cat([sigma, sigma]), positions=positions,
                                          **doubled), device, repeats + 1)
    bare = (out.nfe - guided) * fwd_b + guided * fwd_2b
    return dict(batch=batch, steps=steps, nfe=out.nfe, sample_s=t_sample, forward_B_s=fwd_b, forward_2B_s=fwd_2b,
                loop_overhead=t_sample / bare, tokens=out.tokens, x=x, known=known, cond=cond)


@torch.inference_mode()
def release_speedup(model, fast: dict[str, Any], rows: int, guidance: float) -> dict[str, Any]:
    """(b) the release-style loop on the first `rows` rows of (a)'s batch, same seeds and steps."""
    device = model.device
    gens = [torch.Generator(device).manual_seed(r) for r in range(rows)]
    x, known = fast["x"][:rows], fast["known"][:rows]
    cond = {k: v[:rows] for k, v in fast["cond"].items()}
    t_rel, tokens = timed(lambda: release_style_sample(model, x, known, cond, fast["steps"], guidance, gens), device)
    fast_pair, rel_pair = fast["sample_s"] / fast["batch"], t_rel / rows
    return dict(release_rows=rows, release_s_per_pair=rel_pair, fast_s_per_pair=fast_pair,
                pairs_per_s_fast=1 / fast_pair, pairs_per_s_release=1 / rel_pair, speedup=rel_pair / fast_pair,
                # Equal up to float rounding: a cumulative sum over 8192 probabilities can move a
                # sampling boundary by ~1e-6, so at this size a rare flip (and what follows) is expected.
                token_agreement=float((tokens == fast["tokens"][:rows]).float().mean()))


@torch.inference_mode()
def nfe_table(model, batch: int, guidance: float, settings) -> list[dict[str, Any]]:
    """(c) NFE and time per pair for each (strategy, steps)."""
    device = model.device
    x, known, cond = text_to_image_batch(model.layout, batch, device, seed=1)
    rows = []
    for strategy, steps in settings:
        t, out = timed(partial(run_sampler, model, x, known, cond, steps, guidance, strategy), device)
        rows.append(dict(strategy=strategy, steps=steps, nfe=out.nfe, s_per_pair=t / batch))
    return rows


def demo_accuracy(model: str, settings, n: int, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The phantom demo's scores (`medim.demo.evaluate_demo`: all three tasks, read back by the
    phantom readers) per (strategy, steps); every other sampler option is the model's saved one."""
    from medim.demo import evaluate_demo
    from medim.pipelines.pipeline import MeDiMPipeline

    pipe = MeDiMPipeline.from_pretrained(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    saved, rows = pipe.sampler_config, []
    for strategy, steps in settings:
        pipe.sampler_config = saved.replace(strategy=strategy)
        scores = evaluate_demo(pipe, n=n, num_inference_steps=steps)
        # nfe: forwards summed over evaluate_demo's chunks of 50 rows
        rows.append(dict(strategy=strategy, steps=steps, nfe_text_to_image=scores.nfe["text_to_image"],
                         s_per_sample=sum(scores.seconds.values()) / (3 * n),
                         image_to_report=scores.image_to_report, text_to_image=scores.text_to_image,
                         pairs=scores.pairs, pairs_with_lesions=scores.pairs_with_lesions))
    return rows


def sample_task(denoiser, model, task, steps: int, guidance: float, **options):
    x, known, cond = task
    gens = [torch.Generator(x.device).manual_seed(r) for r in range(x.shape[0])]
    return sample(denoiser, x, known, segments=model.layout.segments, mask_id=model.layout.mask_id,
                  num_inference_steps=steps, guidance_scale=guidance, generator=gens, model_kwargs=cond, **options)


@torch.inference_mode()
def cache_speed(model, tasks: list[str], batch: int, steps: int, guidance: float,
                intervals: list[int]) -> list[dict[str, Any]]:
    """(d) each task uncached, then at each caching interval: seconds and FLOPs per sample."""
    device, rows = model.device, []
    for name in tasks:
        task = task_batch(model.layout, name, batch, device)
        base = None
        for interval in [None, *intervals]:
            with FlopMeter(model) as meter:
                seconds, out = timed(partial(sample_task, ModelDenoiser(model), model, task, steps, guidance,
                                             cache_interval=interval), device)
            row = dict(task=name, cache_interval=interval or "off", nfe=out.nfe, s_per_sample=seconds / batch,
                       gflops_per_step=meter.flops / out.nfe / 1e9, gflops_per_sample=meter.flops / batch / 1e9)
            base = base or dict(row, tokens=out.tokens)
            row.update(speedup=base["s_per_sample"] / row["s_per_sample"],
                       flops_ratio=base["gflops_per_sample"] / row["gflops_per_sample"],
                       same_tokens=float((out.tokens == base["tokens"]).float().mean()),
                       load_average=machine_info()["load_average"][0])
            rows.append(row)
            logger.info("%s", {k: v for k, v in row.items()})
    return rows


@torch.inference_mode()
def compile_speed(model, batch: int, steps: int, guidance: float, mode: str | None) -> dict[str, Any]:
    """(e) text-to-image with the compiled denoiser against eager: seconds per step, compile time
    (the first run's extra time), token agreement."""
    device = model.device
    task = task_batch(model.layout, "text_to_image", batch, device)
    eager = ModelDenoiser(model)
    sample_task(eager, model, task, 2, guidance)  # warm-up
    t_eager, ref = timed(lambda: sample_task(eager, model, task, steps, guidance), device)
    torch._dynamo.reset()
    compiled = ModelDenoiser(model).compile(mode=mode)
    t_first, _ = timed(lambda: sample_task(compiled, model, task, 2, guidance), device)  # compiles both graphs
    t_compiled, out = timed(lambda: sample_task(compiled, model, task, steps, guidance), device)
    torch._dynamo.reset()
    return dict(batch=batch, steps=steps, mode=mode, eager_s_per_step=t_eager / ref.nfe,
                compiled_s_per_step=t_compiled / out.nfe, speedup=t_eager / t_compiled,
                compile_s=t_first - 2 * t_compiled / out.nfe,
                token_agreement=float((out.tokens == ref.tokens).float().mean()))


def parse_settings(text: str) -> list[tuple[str, int]]:
    """"maskgit:128,maskgit:64,threshold:128" -> [(strategy, steps), ...]."""
    out = []
    for item in text.split(","):
        strategy, _, steps = item.partition(":")
        if strategy not in ("maskgit", "threshold", "ddpm") or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--settings: expected strategy:steps items (maskgit|threshold|ddpm), got {item!r}")
        out.append((strategy, int(steps)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=8,
                   help="sampling steps for (a) and (b)")
    p.add_argument("--release-rows", type=int, default=None, help="rows the release loop runs (default: --batch)")
    p.add_argument("--settings", default="maskgit:128,maskgit:64,maskgit:32,threshold:128", help="for (c)")
    p.add_argument("--nfe-batch", type=int, default=2, help="batch for (c)")
    p.add_argument("--skip-nfe", action="store_true")
    p.add_argument("--demo-model", default=None,
                   help="also score a phantom demo pipeline per setting of --settings: 'medim-demo' (shipped) or a "
                        "folder written by `medim demo --retrain`; its saved sampler options apply, not --guidance")
    p.add_argument("--demo-n", type=int, default=16, help="held-out phantoms per setting for --demo-model")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes)")
    p.add_argument("--cache-speed", action="store_true", help="(d) context caching: seconds and FLOPs per sample")
    p.add_argument("--tasks", default="image_to_report,text_to_image,pairs", help="tasks for (d)")
    p.add_argument("--intervals", default="1,2,4,8", help="caching intervals for (d)")
    p.add_argument("--compile-speed", action="store_true", help="(e) compiled vs eager seconds per step")
    p.add_argument("--compile-mode", default=None, choices=[m for m in COMPILE_MODES if m], help="for (e)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.nfe_batch < 1:
        raise SystemExit("--batch, --num-inference-steps and --nfe-batch must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    record = None if args.no_record else RESULTS
    model = medim_v1_model(args.size, dtype=dtype, device=args.device)
    if args.compile:
        model.compile(dynamic=False)
    info = machine_info(args.device)
    settings = dict(size=args.size, dtype=args.dtype, batch=args.batch, guidance=args.guidance, steps=args.steps,
                    compile=args.compile, layout="medim-v1 256+1024", task="text-to-image")
    if args.cache_speed or args.compile_speed:
        return extra_sections(args, model, settings, record)

    logger.info("(a) loop overhead at batch %d", args.batch)
    fast = loop_overhead(model, args.batch, args.steps, args.guidance, args.repeats)
    logger.info("(b) release-style loop")
    rel = release_speedup(model, fast, args.release_rows or args.batch, args.guidance)
    row = {k: v for k, v in fast.items() if not isinstance(v, (torch.Tensor, dict))} | rel
    info["load_average_end"] = machine_info()["load_average"]
    notes = ["loop_overhead = sample_s / (NFE x bare forward returning log-probs); the sampler's denoiser "
             "asks for raw logits (as the pipeline's); speedup = release s/pair / fast s/pair",
             "release-style loop: one sample at a time, guidance as its own forward, full-vocabulary logits"]
    report(f"Sampler: overhead and speed-up ({args.size}, {args.device})", settings, [row], info, notes,
           results=record)

    grid = parse_settings(args.settings)
    if not args.skip_nfe:
        logger.info("(c) NFE per setting at batch %d", args.nfe_batch)
        rows = nfe_table(model, args.nfe_batch, args.guidance, grid)
        report(f"Sampler: NFE and time per pair ({args.size}, {args.device})",
               {**settings, "batch": args.nfe_batch}, rows, machine_info(args.device),
               results=record)
    if args.demo_model:
        logger.info("(c) demo accuracies of %s", args.demo_model)
        rows = demo_accuracy(args.demo_model, grid, args.demo_n, args.device, dtype)
        report("Sampler: demo quality per cost", {**settings, "demo_model": args.demo_model, "n": args.demo_n},
               rows, machine_info(args.device), results=record)
    return 0


def extra_sections(args, model, settings: dict[str, Any], record) -> int:
    """(d) and (e), each when asked for."""
    settings = {**settings, "compile": False, "task": None}
    if args.cache_speed:
        tasks = args.tasks.split(",")
        intervals = [int(i) for i in args.intervals.split(",")]
        start = machine_info(args.device)
        rows = cache_speed(model, tasks, args.batch, args.steps, args.guidance, intervals)
        start["load_average_end"] = machine_info()["load_average"]
        report(f"Sampler: context caching cost ({args.size}, {args.device})", {**settings, "tasks": tasks}, rows, start,
               ["gflops_per_step: network FLOPs of one step for the whole batch (guided steps: 2 x batch rows), "
                "computed from the shapes; speedup and flops_ratio against cache_interval off, same run",
                "same_tokens: share equal to the uncached tokens (random weights: the sampler's bookkeeping, not "
                "quality; see bench_quality.py)"], results=record)
    if args.compile_speed:
        start = machine_info(args.device)
        row = compile_speed(model, args.batch, args.steps, args.guidance, args.compile_mode)
        start["load_average_end"] = machine_info()["load_average"]
        report(f"Sampler: compiled vs eager ({args.size}, {args.device})", {**settings, "task": "text-to-image"},
               [row], start, ["compile_s: extra time of the first (compiling) run; both graphs (unguided, guided)"],
               results=record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

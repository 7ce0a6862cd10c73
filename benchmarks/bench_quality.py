"""The sampler's quality-per-cost map on the shipped demo model: the three demo accuracies (image to
report, text to image, pair consistency) and the share of pairs with lesions, against network
evaluations, FLOPs and seconds per sample, for each strategy and step count, context caching, the
Halton order and the distilled 4-step student (medim-demo-4step).

    python benchmarks/bench_quality.py                     # the whole map: table + docs/sampling_map.png
    python benchmarks/bench_quality.py --only halton,cache-4 --n 100
    python benchmarks/bench_quality.py --fresh             # measure every point again (quiet machine)

Every point runs `medim.demo.evaluate_demo` (n held-out phantoms, seed 10000, batches of 50) with
the model's saved sampler settings under the point's overrides. Finished points are appended to
benchmarks/quality_map.jsonl and reused by later runs with the same n (so a stopped run resumes);
`--fresh` ignores them. FLOPs are computed from the shapes of every forward (common.forward_flops);
seconds are wall-clock on whatever else the machine was doing (the load average is recorded).
Results: a table appended to benchmarks/RESULTS.md (`--no-record` to skip) and the PNG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from medim.diffusion import FAST_OPTIONS, SamplerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, FlopMeter, forward_flops, machine_info, report  # noqa: E402

logger = logging.getLogger("bench_quality")
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / "quality_map.jsonl"
PLOT = ROOT / "docs" / "sampling_map.png"
ALL_STEPS = (4, 8, 16, 32, 64, 128)

# Every point starts from these settings (the demo's saved ones before this map: maskgit, arccos,
# confidence noise 3, unguided), whatever the model saved, so stored points stay comparable.
MAP_BASE = SamplerConfig(num_inference_steps=32, confidence_temperature=3.0)
# One line of the map per setting: (name, sampler overrides over MAP_BASE, steps).
LINES: list[tuple[str, dict[str, Any] | None, tuple[int, ...]]] = [
    ("maskgit-arccos", {}, ALL_STEPS),
    ("maskgit-cosine", {"schedule": "cosine"}, ALL_STEPS),
    ("maskgit-linear", {"schedule": "linear"}, ALL_STEPS),
    ("threshold-0.7", {"strategy": "threshold", "threshold": 0.7}, ALL_STEPS),
    ("threshold-0.9", {"strategy": "threshold", "threshold": 0.9}, ALL_STEPS),
    ("threshold-0.98", {"strategy": "threshold", "threshold": 0.98}, ALL_STEPS),
    ("ddpm", {"strategy": "ddpm"}, ALL_STEPS),
    ("halton", {"order": "halton"}, (8, 16, 32)),
    ("cache-1", {"cache_interval": 1}, (32,)),
    ("cache-2", {"cache_interval": 2}, (16, 32, 64)),
    ("cache-4", {"cache_interval": 4}, (16, 32, 64)),
    ("cache-8", {"cache_interval": 8}, (16, 32, 64)),
    ("halton+cache-4", {"order": "halton", "cache_interval": 4}, (8, 16, 32)),
    ("fast", {k: v for k, v in FAST_OPTIONS.items() if k != "num_inference_steps"}, (16, 32, 64)),  # the preset
    # The released MeDiM's sampler (guidance 5, confidence temperature 10; 128 steps), with fewer
    # steps and with caching.
    ("release", {"guidance_scale": 5.0, "confidence_temperature": 10.0}, (32, 64, 128)),
    ("release+cache-4", {"guidance_scale": 5.0, "confidence_temperature": 10.0, "cache_interval": 4}, (32, 64, 128)),
    # The distilled student (`medim distill`, configs/distill_demo.yaml) with its saved settings
    # (None: read from the model, `saved_overrides`).
    ("distilled-4step", None, (4, 8, 16)),
]
# Lines measured on another bundled model than --model.
LINE_MODELS = {"distilled-4step": "medim-demo-4step"}
ACCURACIES = ("image_to_report", "text_to_image", "pairs")


def saved_overrides(pipe) -> dict[str, Any]:
    """The pipeline's saved sampler settings as overrides of MAP_BASE (its step count aside)."""
    base = MAP_BASE.to_dict()
    return {k: v for k, v in pipe.sampler_config.to_dict().items() if k != "num_inference_steps" and v != base[k]}


def measure(pipe, name: str, overrides: dict[str, Any], steps: int, n: int) -> dict[str, Any]:
    """One point of the map: evaluate_demo under MAP_BASE with `overrides` at `steps`, with its FLOPs."""
    from medim.demo import evaluate_demo

    saved = pipe.sampler_config
    pipe.sampler_config = MAP_BASE.replace(**overrides)
    try:
        with FlopMeter(pipe.model) as meter:
            scores = evaluate_demo(pipe, n=n, num_inference_steps=steps)
    finally:
        pipe.sampler_config = saved
    chunks = math.ceil(n / 50)  # evaluate_demo's batches; nfe is summed over them
    return dict(line=name, overrides=overrides, steps=steps, n=n,
                image_to_report=scores.image_to_report, text_to_image=scores.text_to_image, pairs=scores.pairs,
                pairs_with_lesions=scores.pairs_with_lesions,
                nfe=sum(scores.nfe.values()) / (3 * chunks), gflops=meter.flops / (3 * n) / 1e9,
                s_per_sample=sum(scores.seconds.values()) / (3 * n),
                load_average=machine_info()["load_average"])


def whole_forward_gflops(model) -> float:
    """GFLOPs of one whole unguided forward per sample, averaged over the three tasks (the unit of
    the plot's cost axis: an uncached unguided setting sits at its NFE)."""
    layout = model.layout
    keys = layout.backbone_inputs(torch.full((1, layout.state_len), layout.mask_id)).input_ids.shape[1]
    text, image = layout.text_segment, layout.image_segment
    outputs = [{"text": text.length}, {"image": image.length}, {"text": text.length, "image": image.length}]
    return sum(forward_flops(model, 1, keys, keys, o) for o in outputs) / 3 / 1e9


# A point whose generated pairs almost never show a lesion has trivially consistent pairs (the
# phantoms have one in 2/3 of images): below half that share it is called collapsed and left out
# of the comparisons.
MIN_LESION_SHARE = 1 / 3


def pick(rows: list[dict[str, Any]], within: float) -> dict[str, Any] | None:
    """The cheapest point (FLOPs) whose three accuracies are all within `within` of the best
    measured (each accuracy's best may come from another point; collapsed points neither set a
    best nor are picked; None if no point is that close)."""
    rows = [r for r in rows if r["pairs_with_lesions"] >= MIN_LESION_SHARE]
    best = {k: max(r[k] for r in rows) for k in ACCURACIES}
    good = [r for r in rows if all(r[k] >= best[k] - within for k in ACCURACIES)]
    return min(good, key=lambda r: r["gflops"]) if good else None


def plot(rows: list[dict[str, Any]], unit: float, path: Path, n: int) -> None:
    """Accuracy against cost (log x), one line per setting, one panel per score."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("the plot needs matplotlib: pip install -e '.[dev]' (or pip install matplotlib)") from e
    panels = [("image_to_report", "image -> report"), ("text_to_image", "text -> image"),
              ("pairs", "pairs consistent"), ("pairs_with_lesions", "pairs with a lesion (phantoms: 0.667)")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    # tab20 gives every line its own colour; dashed: the lines with caching or guidance.
    styles = {name: (plt.cm.tab20(i % 20), "--" if "cache" in name or name.startswith(("release", "fast")) else "-")
              for i, (name, _, _) in enumerate(LINES)}
    for ax, (key, title) in zip(axes.flat, panels):
        for name, _, _ in LINES:
            line = sorted((r for r in rows if r["line"] == name), key=lambda r: r["gflops"])
            if not line:
                continue
            color, dash = styles[name]
            ax.plot([r["gflops"] / unit for r in line], [r[key] for r in line], dash, color=color,
                    marker="o", markersize=4, label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("network FLOPs per sample / one whole forward (= NFE if uncached, unguided)")
        ax.set_ylabel("attribute accuracy" if key != "pairs_with_lesions" else "share of generated pairs")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=8, fontsize=8)
    fig.suptitle(f"medim-demo sampler map: n = {n} held-out phantoms per point")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_cache(path: Path, n: int, overrides: dict[str, dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The finished points of `path` at `n` measured with each line's current `overrides` (a point
    of a line whose settings changed since is measured again)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill: measured again
                continue
            if row.get("n") == n and row.get("overrides") == overrides.get(row.get("line")):
                done[(row["line"], row["steps"])] = row
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="medim-demo", help="'medim-demo' or a phantom-trained pipeline folder")
    p.add_argument("--n", type=int, default=200, help="held-out phantoms per point")
    p.add_argument("--only", default=None, help=f"comma-separated lines to run, of: {[name for name, _, _ in LINES]}")
    p.add_argument("--fresh", action="store_true", help="ignore the points saved in --cache")
    p.add_argument("--cache", type=Path, default=CACHE, help="finished points (JSON lines), for resuming")
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    names = [name for name, _, _ in LINES]
    only = names if args.only is None else args.only.split(",")
    if unknown := sorted(set(only) - set(names)):
        raise SystemExit(f"--only: unknown lines {unknown}; accepted: {names}")
    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from medim.pipelines.pipeline import MeDiMPipeline

    pipes = {}

    def pipeline(model: str):
        if model not in pipes:
            pipes[model] = MeDiMPipeline.from_pretrained(model)
            pipes[model].set_progress_bar_config(disable=True)
        return pipes[model]

    settings = {name: saved_overrides(pipeline(LINE_MODELS[name])) if overrides is None else overrides
                for name, overrides, _ in LINES}
    done = {} if args.fresh else load_cache(args.cache, args.n, settings)
    for name, _, steps_list in LINES:
        overrides = settings[name]
        if name not in only:
            continue
        for steps in steps_list:
            if (name, steps) in done:
                continue
            logger.info("%s at %d steps (n=%d)", name, steps, args.n)
            row = measure(pipeline(LINE_MODELS.get(name, args.model)), name, overrides, steps, args.n)
            done[(name, steps)] = row
            with open(args.cache, "a") as f:  # one line per point: a kill loses at most the point running
                f.write(json.dumps(row) + "\n")
    rows = [done[(name, s)] for name, _, steps in LINES for s in steps if (name, s) in done]
    unit = whole_forward_gflops(pipeline(args.model).model)
    plot(rows, unit, args.plot, args.n)
    columns = ("line", "steps", "nfe", "gflops", "s_per_sample", *ACCURACIES, "pairs_with_lesions")
    table = [{**{k: r[k] for k in columns}, "load": r["load_average"][0]} for r in rows]
    plot_path = args.plot.relative_to(ROOT) if args.plot.is_relative_to(ROOT) else args.plot
    notes = [f"every point: {MAP_BASE.to_dict()} with the line's overrides "
             f"({settings})",
             "nfe: network evaluations per sample (a cached step counts as one); gflops: network FLOPs per sample, "
             "averaged over the three tasks; s_per_sample: wall-clock, comparable only between points of similar "
             "load (the 1-minute load average when the point ended; the machine's cores: "
             f"{machine_info()['cpu_cores']})", f"plot: {plot_path}"]
    collapsed = sorted({f"{r['line']}@{r['steps']}" for r in rows if r["pairs_with_lesions"] < MIN_LESION_SHARE})
    notes.append(f"collapsed (pairs with a lesion < {MIN_LESION_SHARE:.3f}; consistent pairs then mean nothing), left "
                 f"out of the picks below: {', '.join(collapsed) or 'none'}")
    # The picks are among the model's own sampler settings; the distilled student is another model,
    # compared below.
    own = [r for r in rows if r["line"] not in LINE_MODELS]
    for within in (0.005, 0.01):
        choice = pick(own, within)
        notes.append(f"cheapest sampler setting of {args.model} with all three accuracies within {100 * within:g} "
                     "points of its best: " + (
                         f"{choice['line']} at {choice['steps']} steps ({choice['gflops']:.3g} GFLOPs per sample)"
                         if choice else "none"))
    release = done.get(("release", 128))
    if release:
        for label, candidates in ((f"sampler setting of {args.model}", own), ("point of any model", rows)):
            equal = [r for r in candidates if all(r[k] >= release[k] - 0.01 for k in ACCURACIES)
                     and r["pairs_with_lesions"] >= MIN_LESION_SHARE]
            cheapest = min(equal, key=lambda r: r["gflops"])
            notes.append(f"cheapest {label} within 1 point of the release settings (or better) on all three: "
                         f"{cheapest['line']} at {cheapest['steps']} steps: "
                         f"{release['gflops'] / cheapest['gflops']:.1f}x fewer FLOPs, "
                         f"{release['s_per_sample'] / cheapest['s_per_sample']:.1f}x fewer seconds")
    teacher = done.get(("maskgit-cosine", 32))  # the demo's own settings
    for steps in (4, 8):
        if teacher and (student := done.get(("distilled-4step", steps))):
            notes.append(f"distilled-4step at {steps} steps against the teacher at 32: " + ", ".join(
                f"{k} {student[k]:.3f} vs {teacher[k]:.3f}" for k in (*ACCURACIES, "pairs_with_lesions")))
    report(f"Sampler quality map (demo, n={args.n})", {"model": args.model, "n": args.n}, table,
           machine_info(), notes, results=None if args.no_record else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

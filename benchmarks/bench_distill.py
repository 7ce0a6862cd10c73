"""Time per distillation step of the demo (`medim distill`, configs/distill_demo.yaml) on this machine,
and what the full recipe costs at that speed.

    python benchmarks/bench_distill.py                       # 32 -> 4 and 32 -> 8 on 1 and 2 threads
    python benchmarks/bench_distill.py --pairs 32:4 --threads 2 --steps 20 --cache cache/demo-phantoms

Each row builds a `Distiller` from configs/distill_demo.yaml (batch 32, fp32) over a token cache of
training phantoms made with the demo (`--cache`, or 512 phantoms cached into a temporary folder),
runs one untimed step, then times `--steps` optimizer steps (`Distiller.train_step`: k teacher
forwards per row without gradients, one student forward and backward, AdamW, EMA). `recipe_min` is
the config's `train.max_steps` at that speed. Numbers on a shared machine vary with its load (the
load average is recorded).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "distill_demo.yaml"


def demo_cache(directory: Path, n: int = 512) -> Path:
    """`n` training phantoms (seed 0, as the demo's training) cached with the demo."""
    from medim.data.cache import build_token_cache
    from medim.data.datasets import build_dataset
    from medim.pipelines.pipeline import MeDiMPipeline

    demo = MeDiMPipeline.from_pretrained("medim-demo")
    build_token_cache(build_dataset("phantom", n=n, seed=0, size=64), directory, vqgan=demo.vqgan,
                      tokenizer=demo.tokenizer, layout=demo.layout, batch_size=128, show_progress=False)
    return directory


def time_steps(cache: Path, out: Path, teacher_steps: int, student_steps: int, steps: int) -> dict:
    from medim.training import Distiller, load_config

    config = load_config(CONFIG, [f"data.cache={cache}", f"train.output_dir={out}", "data.val_size=0",
                                  f"distill.teacher_steps={teacher_steps}", f"distill.student_steps={student_steps}",
                                  "checkpoint.resume=null"])
    distiller = Distiller(config)
    distiller.train_step()  # untimed: first-call allocations
    start = time.perf_counter()
    for _ in range(steps):
        distiller.train_step()
    per_step = (time.perf_counter() - start) / steps
    batch = config.train.global_batch_size
    return {"teacher_steps": teacher_steps, "student_steps": student_steps,
            "k": teacher_steps // student_steps, "threads": torch.get_num_threads(), "batch": batch,
            "s_per_step": round(per_step, 3), "examples_per_s": round(batch / per_step, 1),
            "recipe_steps": config.train.max_steps, "recipe_min": round(config.train.max_steps * per_step / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["32:4", "32:8"], help="teacher:student step pairs")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads per row")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row")
    parser.add_argument("--cache", type=Path, default=None, help="a demo token cache (default: 512 phantoms)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or demo_cache(Path(tmp) / "cache")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for i, pair in enumerate(args.pairs):
                teacher, student = (int(v) for v in pair.split(":"))
                rows.append(time_steps(cache, Path(tmp) / f"run{threads}-{i}", teacher, student, args.steps))
                print(rows[-1], flush=True)
    report("Distillation step time (demo, configs/distill_demo.yaml, cpu)",
           {"steps": args.steps, "config": CONFIG.name}, rows, machine_info("cpu"),
           notes=["recipe_min: train.max_steps of the config at the measured s_per_step"])


if __name__ == "__main__":
    main()

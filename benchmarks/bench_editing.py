"""Editing and scoring on the shipped demo model (issues 19, 29), measured with the phantom readers.

    python benchmarks/bench_editing.py                        # all four, the issues' sizes (~1 h on 2 cores)
    python benchmarks/bench_editing.py --only inpaint         # by lesion count, 1 and 4 candidates (~10 min)

a) Inpainting edits by the number of lesions already present (issue 29): held-out phantoms
   (`--seed`, default HOLDOUT_SEED, which nothing else in the project draws) holding exactly 0, 1
   or 2 lesions (by spec and by `read_image`), `--n-inpaint` per bucket. Add: mask one empty
   quadrant and prompt with the report of the phantom plus a lesion there (with two present the
   result holds three, more than any training phantom: the out-of-distribution bucket, whose
   prompts past the demo's 40 text slots `inpaint` refuses); remove: mask a quadrant holding a
   lesion and prompt with the report without it. Success: `read_image` of the result finds the
   edited quadrant as asked (a lesion of the asked size and density, or none) and the other three
   as they were (a refused prompt counts as a failure).
b) Retrieval: `pipe.rank` of every image with every report, in both likelihood directions; a hit
   when the top report (image) describes the same attributes as the true one (`parse_report`
   equal), top-1 and top-5, each against the chance level of the same measure.
c) Infilling: in reports with findings, the size or the density word of each finding becomes a
   one-token gap (`[MASK]`), or a gap of up to three tokens (`[MASK:3]`, the length chosen by
   likelihood: a capitalised " Small" takes three), filled with the image known;
   accuracy of the filled attribute.
d) The score's spread: the standard deviation of one pair's `score` across seeds, per num_samples.
Results are printed and appended to benchmarks/RESULTS.md as one section (`--no-record` to skip).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, report  # noqa: E402

from medim import MeDiMPipeline  # noqa: E402
from medim.data import synthetic  # noqa: E402
from medim.demo.settings import EVAL_SEED, IMAGE_SIZE  # noqa: E402
from medim.pipelines.editing import NUM_CANDIDATES  # noqa: E402
from medim.pipelines.scoring import NUM_SAMPLES  # noqa: E402

HOLDOUT_SEED = 29_029  # issue 29's held-out phantoms: a seed nothing else in the project draws from

QUADRANTS = [(side, level) for side in synthetic.SIDES for level in synthetic.LEVELS]


def quadrant_mask(side: str, level: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """The quadrant's pixels: the patient's right is the image's left half, upper the top half."""
    mask = np.zeros((size, size), dtype=bool)
    rows = slice(0, size // 2) if level == "upper" else slice(size // 2, size)
    cols = slice(0, size // 2) if side == "right" else slice(size // 2, size)
    mask[rows, cols] = True
    return mask


def held_out(n: int, keep=lambda spec: True) -> list[tuple]:
    """The first `n` held-out phantoms (the demo's evaluation seed) whose read spec passes `keep`."""
    out, i = [], 0
    while len(out) < n:
        pair = synthetic.make_pair(np.random.default_rng([EVAL_SEED, i]), size=IMAGE_SIZE)
        i += 1
        if keep(synthetic.read_image(pair[0])):
            out.append(pair)
    return out


def bucket(count: int, n: int, seed: int) -> list[tuple]:
    """The first `n` phantoms of `seed` holding exactly `count` lesions, by their spec and by the reader."""
    out, i = [], 0
    while len(out) < n:
        pair = synthetic.make_pair(np.random.default_rng([seed, i]), size=IMAGE_SIZE)
        i += 1
        if len(pair[2].lesions) == count == len(synthetic.read_image(pair[0]).lesions):
            out.append(pair)
    return out


def edit_requests(pairs: list[tuple], mode: str, rng: np.random.Generator) -> list[tuple]:
    """Per phantom (its read spec, the quadrant to edit, the spec asked for, the prompt): add a
    lesion of random size and density to a random empty quadrant, or remove a random lesion; the
    prompt is the asked spec's report (findings in reading order, as the training reports)."""
    out = []
    for image, _, _ in pairs:
        spec = synthetic.read_image(image)
        if mode == "add":
            empty = [q for q in QUADRANTS if spec.at(*q) is None]
            quadrant = empty[rng.integers(len(empty))]
            new = synthetic.Lesion(*quadrant, synthetic.SIZES[rng.integers(2)], synthetic.DENSITIES[rng.integers(2)])
            target = synthetic.PhantomSpec((*spec.lesions, new))
        else:
            quadrant = spec.lesions[rng.integers(len(spec.lesions))].quadrant
            target = synthetic.PhantomSpec(tuple(x for x in spec.lesions if x.quadrant != quadrant))
        out.append((spec, quadrant, target, synthetic.write_report(target, rng)))
    return out


def inpainting(pipe, n: int, mode: str, count: int, seed: int, options: dict) -> dict:
    """Edits of `n` held-out phantoms with `count` lesions. Success: the reader finds the edited
    quadrant as asked and the other three as they were. A prompt past the model's text length is
    refused by `inpaint` (counted, not run); success is over all n, refused ones failing."""
    pairs = bucket(count, n, seed)
    requests = edit_requests(pairs, mode, np.random.default_rng([seed, count, mode == "add"]))
    fits = [i for i, r in enumerate(requests) if pipe.layout.report_lengths(pipe.tokenizer, [r[3]])[0]
            <= pipe.layout.text_len]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weak edits are counted below
        out = pipe.inpaint([pairs[i][0] for i in fits], [quadrant_mask(*requests[i][1]) for i in fits],
                           [requests[i][3] for i in fits], generator=[torch.Generator().manual_seed(i) for i in fits],
                           **options)
    seconds = time.perf_counter() - start
    success, kept, weak_failed = 0, 0, 0
    for k, (image, i) in enumerate(zip(out.images, fits)):
        spec, quadrant, target, _ = requests[i]
        read = synthetic.read_image(image)
        others = all(read.at(*o) == spec.at(*o) for o in QUADRANTS if o != quadrant)
        ok = others and read.at(*quadrant) == target.at(*quadrant)
        kept += others
        success += ok
        weak_failed += (k in out.weak_edits) and not ok
    failed = len(fits) - success
    return dict(success=success / n, run=len(fits), success_run=success / max(len(fits), 1), others_kept=kept / n,
                weak=len(out.weak_edits), weak_failed=weak_failed, failed=failed, seconds=seconds)


def chance(specs: list, k: int) -> float:
    """Expected hit rate of k reports drawn at random (without replacement) for each item."""
    n = len(specs)
    same = [sum(s == t for t in specs) for s in specs]
    return float(np.mean([1 - math.comb(n - m, k) / math.comb(n, k) for m in same]))


def retrieval(pipe, n: int, directions: list[str], num_samples: int, batch_size: int) -> list[dict]:
    images, reports, _ = zip(*held_out(n))
    specs = [synthetic.parse_report(r) for r in reports]
    rows = []
    for direction in directions:
        start = time.perf_counter()
        matrix = pipe.rank(list(images), list(reports), direction=direction, num_samples=num_samples,
                           batch_size=batch_size, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        for name, m in (("image -> report", matrix), ("report -> image", matrix.T)):
            for k in (1, 5):
                top = m.topk(k, dim=1).indices.tolist()
                hit = np.mean([any(specs[j] == specs[i] for j in top[i]) for i in range(n)])
                rows.append(dict(likelihood=direction, retrieval=name, k=k, hit=float(hit), chance=chance(specs, k),
                                 seconds=seconds))
    return rows


def attribute_of(word: str) -> tuple[str, str] | None:
    """("size", value) or ("density", value) when `word` names one (read by parse_report)."""
    lesion = synthetic.parse_report(f"{word} in the right upper zone", strict=False).at("right", "upper")
    if lesion is None:
        return None
    return ("size", lesion.size) if lesion.size else ("density", lesion.density) if lesion.density else None


def infilling(pipe, n: int, gap: str, options: dict) -> dict:
    rng = np.random.default_rng(2)
    pairs = held_out(n, lambda s: bool(s.lesions))
    templates, truth = [], []
    for _, text, _ in pairs:
        sentences, asked = re.split(r"(?<=\.) ", text), []
        for s, sentence in enumerate(sentences):
            found = synthetic.parse_report(sentence).lesions
            if not found:
                continue
            kind = ("size", "density")[rng.integers(2)]
            words = sentence.rstrip(".").split(" ")
            w = next(i for i, word in enumerate(words) if (attribute_of(word) or ("",))[0] == kind)
            sentences[s] = " ".join([*words[:w], gap, *words[w + 1 :]]) + "."
            asked.append((found[0].quadrant, kind, getattr(found[0], kind)))
        templates.append(" ".join(sentences))
        truth.append(asked)
    start = time.perf_counter()
    out = pipe.infill(templates, [p[0] for p in pairs], generator=[torch.Generator().manual_seed(i) for i in range(n)],
                      **options)
    seconds = time.perf_counter() - start
    right = total = 0
    for fills, asked in zip(out.fills, truth):
        for fill, (_, kind, value) in zip(fills, asked):
            attribute = attribute_of(fill.split(" ")[0]) if fill else None
            right += attribute == (kind, value)
            total += 1
    return dict(accuracy=right / total, gaps=total, nfe=out.nfe, seconds=seconds)


def spread(pipe, n: int, counts: list[int], seeds: int, batch_size: int) -> list[dict]:
    images, reports, _ = zip(*held_out(n))
    rows = []
    for k in counts:
        runs = [pipe.score(list(images), list(reports), num_samples=k, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(s)) for s in range(seeds)]
        scores = torch.stack([r.scores for r in runs])
        per_token = torch.stack([r.per_token for r in runs])
        rows.append(dict(num_samples=k, mean_score=scores.mean().item(), std=scores.std(0).mean().item(),
                         std_per_token=per_token.std(0).mean().item(), stderr_reported=runs[0].stderr.mean().item()))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="medim-demo")
    p.add_argument("--only", nargs="+", choices=("inpaint", "retrieval", "infill", "spread"),
                   default=["inpaint", "retrieval", "infill", "spread"])
    p.add_argument("--n-inpaint", type=int, default=50, help="phantoms per edit kind and lesion count")
    p.add_argument("--num-candidates", type=int, nargs="+", default=[1, NUM_CANDIDATES],
                   help="inpaint's edits per image (1: one sample, as before issue 29)")
    p.add_argument("--seed", type=int, default=HOLDOUT_SEED, help="held-out phantoms of inpainting")
    p.add_argument("--n-retrieval", type=int, default=100)
    p.add_argument("--n-infill", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="time points per pair (rank, infill lengths)")
    p.add_argument("--directions", nargs="+", default=["report|image", "image|report"])
    p.add_argument("--gaps", nargs="+", default=["[MASK]", "[MASK:3]"], help="the gap each blanked word becomes")
    p.add_argument("--spread-counts", type=int, nargs="+", default=[4, NUM_SAMPLES, 64])
    p.add_argument("--spread-seeds", type=int, default=5)
    p.add_argument("--spread-n", type=int, default=100)
    p.add_argument("--mask-dilation", type=int, default=0)
    p.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=None,
                   help="sampling steps (default: the model's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's)")
    p.add_argument("--strategy", default=None, help="sampler strategy (default: the model's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    pipe = MeDiMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    info = machine_info()
    sampling = dict(num_inference_steps=args.steps, temperature=args.temperature, strategy=args.strategy)
    sampling = {k: v for k, v in sampling.items() if v is not None}
    rows, notes = [], []

    def add(measurement: str, value: float, target: float | str = "", chance_level: float | str = "", n: int = 0,
            cost: str = "", note: str = "") -> None:
        rows.append(dict(measurement=measurement, value=round(value, 4), chance=chance_level, target=target, n=n,
                         cost=cost, note=note))
        print(rows[-1], flush=True)

    if "inpaint" in args.only:
        for candidates in args.num_candidates:
            options = dict(mask_dilation=args.mask_dilation, num_candidates=candidates, batch_size=100, **sampling)
            for mode, count in (("add", 0), ("add", 1), ("add", 2), ("remove", 1), ("remove", 2)):
                r = inpainting(pipe, args.n_inpaint, mode, count, args.seed, options)
                beyond = mode == "add" and count == 2  # three lesions: the training phantoms hold 0-2
                note = (f"out of distribution: {args.n_inpaint - r['run']} prompts refused (past text_len), "
                        f"success {r['success_run']:.2f} of the {r['run']} run; " if beyond else "")
                add(f"inpaint {mode}, {count} lesion(s) present, {candidates} candidate(s): success", r["success"],
                    "" if beyond else 0.9, n=args.n_inpaint, cost=f"{r['seconds']:.0f} s",
                    note=note + f"others kept {r['others_kept']:.2f}; weak_edits {r['weak']} "
                    f"({r['weak_failed']} of the {r['failed']} failed)")
    if "retrieval" in args.only:
        for r in retrieval(pipe, args.n_retrieval, args.directions, args.num_samples, args.batch_size):
            target = 0.9 if (r["likelihood"], r["k"]) == ("report|image", 1) else ""
            add(f"retrieval {r['retrieval']} top-{r['k']} by log p({r['likelihood']})", r["hit"], target,
                round(r["chance"], 4), args.n_retrieval, f"{r['seconds']:.0f} s per matrix")
    if "infill" in args.only:
        for gap in args.gaps:
            r = infilling(pipe, args.n_infill, gap, dict(num_samples=args.num_samples, batch_size=50, **sampling))
            add(f"infill {gap}: attribute accuracy", r["accuracy"], 0.9, 0.5, r["gaps"], f"{r['seconds']:.0f} s")
    if "spread" in args.only:
        for r in spread(pipe, args.spread_n, args.spread_counts, args.spread_seeds, args.batch_size):
            add(f"score std across seeds, num_samples={r['num_samples']} (nats; per token {r['std_per_token']:.3f}; "
                f"mean score {r['mean_score']:.2f}, reported stderr {r['stderr_reported']:.2f})", r["std"],
                n=args.spread_n)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    notes.append("retrieval hit: the top item's report describes the same attributes (parse_report equal); chance: "
                 "the same measure for items drawn at random")
    notes.append("log p(report | image) ranks images for a report fairly; a row (reports for one image) mixes in "
                 "each report's own prior (short reports score higher); log p(image | report) the other way round")
    settings = dict(model=args.model, num_samples=args.num_samples, mask_dilation=args.mask_dilation, **sampling,
                    sampler=pipe.sampler_config.to_dict())
    report("Editing and scoring on the demo (issues 19, 29)", settings, rows, info, notes,
           results=None if args.no_record else Path(__file__).resolve().parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

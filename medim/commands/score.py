"""`medim score`: how well reports fit images, as likelihood bounds (`MeDiMPipeline.score` / `rank`).

Pairs: image i with report i, one JSON line each in `--out`. `--rank`: every image with every
report, written as one JSON object whose "matrix" holds the scores (rows = images): by default the
pointwise mutual information, which ranks along both axes (`MeDiMPipeline.rank`). The same `--seed`
gives the same numbers; the output is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medim.commands.common import (
    HelpFormatter,
    add_pipeline_arguments,
    check_output_file,
    expand_globs,
    load_pipeline,
    pipeline_spec,
    read_lines,
    usage_errors,
)

HELP = "score image-report pairs by likelihood (log p(report | image) bounds), or rank all of them"

logger = logging.getLogger(__name__)

PAIR_DIRECTIONS = ("report|image", "image|report", "joint")  # as medim.pipelines.scoring (kept torch-free here)
RANK_DIRECTIONS = ("pmi", *PAIR_DIRECTIONS)
ESTIMATORS = ("one-step", "elbo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    add_pipeline_arguments(parser)
    parser.add_argument("--images", nargs="+", required=True, help="image files or glob patterns (quote them)")
    parser.add_argument("--reports", type=Path, required=True,
                        help="text file, one report a line (blank lines skipped)")
    parser.add_argument("--out", type=Path, required=True,
                        help="pairs: a JSON-lines file, one line per pair; --rank: a JSON file with the matrix")
    parser.add_argument("--rank", action="store_true",
                        help="score every image with every report (rows = images) instead of image i with report i")
    parser.add_argument("--direction", choices=RANK_DIRECTIONS, default=None,
                        help="report|image: log p(report | image) (pairs' default); image|report; joint; "
                             "pmi: log p(image | report) - log p(image) (--rank only, its default)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=None,
                        help="--rank: how pmi is estimated (one-step, its default; elbo: --num-samples time points); "
                             "the bounds are always elbo")
    parser.add_argument("--num-samples", type=int, default=16, help="time points per pair (more: less noise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the time points and masks")
    parser.add_argument("--batch-size", type=int, default=256, help="pair x time-point rows per forward")


def run(args: argparse.Namespace) -> int:
    import torch

    from medim.data.images import read_image_file
    from medim.pipelines.scoring import MAX_NUM_SAMPLES
    from medim.utils.checks import check_int
    from medim.utils.hub import atomic_file

    # Everything that can be checked is checked before the (slow) model load.
    direction = args.direction or ("pmi" if args.rank else "report|image")
    if direction == "pmi" and not args.rank:
        raise SystemExit("--direction pmi scores every image with every report: add --rank")
    if args.estimator == "one-step" and direction != "pmi":
        raise SystemExit(f"--estimator one-step estimates --direction pmi only, got {direction}")
    with usage_errors():
        check_int(args.num_samples, "--num-samples", minimum=1, maximum=MAX_NUM_SAMPLES)
        check_int(args.batch_size, "--batch-size", minimum=1)
        check_int(args.seed, "--seed", minimum=0, maximum=2**64 - 1)  # what torch.Generator.manual_seed takes
    images, reports = expand_globs(args.images, "--images"), read_lines(args.reports, "--reports", "report")
    for path in images:
        try:
            read_image_file(path, lambda opened: opened.size)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--images: {e}" if path in str(e) else f"--images: {path}: {e}") from None
    if not args.rank and len(images) != len(reports):
        raise SystemExit(f"{len(images)} images but {len(reports)} reports: pairs need as many of each "
                         "(or use --rank to score every image with every report)")
    check_output_file(args.out, "--out")
    pipe = load_pipeline(pipeline_spec(args, "medim score"))
    options = dict(direction=direction, num_samples=args.num_samples, batch_size=args.batch_size,
                   generator=torch.Generator().manual_seed(args.seed))
    settings = dict(medim="score", model=args.model, direction=direction, num_samples=args.num_samples,
                    seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.rank:
        matrix = pipe.rank(images, reports, estimator=args.estimator, **options)
        with atomic_file(args.out) as f:
            json.dump({**settings, "images": images, "reports": reports, "matrix": matrix.tolist()}, f)
            f.write("\n")
        print(f"{len(images)} x {len(reports)} scores in {args.out}")
        return 0
    out = pipe.score(images, reports, **options)
    with atomic_file(args.out) as f:
        for i, (path, report) in enumerate(zip(images, reports)):
            f.write(json.dumps({"medim": "score", "index": i, "image": path, "report": report,
                                "score": out.scores[i].item(),
                                "per_token": out.per_token[i].item(), "num_tokens": int(out.num_tokens[i]),
                                "stderr": out.stderr[i].item(), **settings}) + "\n")
    print(f"{len(images)} pair scores in {args.out}")
    return 0

"""`medim evaluate reports|fid`: score what `medim generate` wrote.

Reports are read from a folder of `.txt` files (id = file stem), a `manifest.jsonl` (one JSON object
per line with "report" and an "id" or a file name), or a folder holding a `manifest.jsonl`;
predictions are matched to references by id.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medim.data.datasets import iter_jsonl
from medim.hub import atomic_file

HELP = "score generated reports (BLEU/ROUGE/METEOR/CIDEr-D) or images (FID) against references"

logger = logging.getLogger(__name__)

_NAME_KEYS = ("id", "file_name", "file", "report_file", "image")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    rep = sub.add_parser("reports", help="report metrics", description="report metrics")
    rep.add_argument("--pred", required=True, help="folder of .txt reports, or manifest.jsonl")
    rep.add_argument("--ref", required=True, help="folder of .txt reports, or manifest.jsonl")
    rep.add_argument(
        "--protocol", choices=("medim", "coco"), default="medim", help="default: medim (the paper's)"
    )
    rep.add_argument("--wordnet", default=None, help="WordNet folder for METEOR, or 'none' to skip METEOR")
    rep.add_argument("--output", default=None, help="write the result as JSON here")
    img = sub.add_parser(
        "fid", help="FID between two image folders", description="FID (pytorch-fid defaults)"
    )
    img.add_argument("--real", required=True, help="folder of real images")
    img.add_argument("--fake", required=True, help="folder of generated images")
    img.add_argument("--weights", required=True, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    img.add_argument("--batch-size", type=int, default=50)
    img.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    img.add_argument("--output", default=None, help="write the result as JSON here")


def read_reports(source: str | Path) -> dict[str, str]:
    """id -> report text from a folder of .txt files, a manifest.jsonl, or a folder holding one."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "manifest.jsonl").is_file():
        path = path / "manifest.jsonl"
    if path.is_dir():
        reports = {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(path.glob("*.txt"))}
        if not reports:
            raise ValueError(f"{path} holds no .txt reports and no manifest.jsonl")
        return reports
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a folder or a manifest.jsonl")
    reports = {}
    for n, row in iter_jsonl(path):
        name = next((k for k in _NAME_KEYS if isinstance(row, dict) and row.get(k) is not None), None)
        if name is None or not isinstance(row.get("report"), str):
            raise ValueError(f"{path}:{n} needs a 'report' string and one of {_NAME_KEYS}")
        # An "id" is used as is; a file name matches the stem of a .txt report.
        key = str(row[name]) if name == "id" else Path(str(row[name])).stem
        if key in reports:
            raise ValueError(f"{path}:{n} repeats id {key!r}")
        reports[key] = row["report"].strip()
    return reports


def _write(result: dict, output: str | None) -> None:
    if output:
        with atomic_file(output) as f:
            json.dump(result, f, indent=2)
        print(f"wrote {output}")


def _run_reports(args) -> int:
    from medim.evaluation import report_metrics

    preds, refs = read_reports(args.pred), read_reports(args.ref)
    extra = sorted(set(preds) - set(refs))
    if extra:
        logger.warning("%d predictions have no reference and are ignored (e.g. %s)", len(extra), extra[0])
    ids = sorted(refs)
    missing = [i for i in ids if i not in preds]
    if missing:
        logger.warning(
            "%d references have no prediction; they count as empty (e.g. %s)", len(missing), missing[0]
        )
    wordnet = False if args.wordnet and args.wordnet.lower() == "none" else args.wordnet
    out = report_metrics([preds.get(i, "") for i in ids], [refs[i] for i in ids], args.protocol, wordnet)
    result = out.to_dict()
    result["num_missing"] = len(missing)
    print(f"{'metric':<10} {'value':>8}  implementation")
    for name, value in out.scores.items():
        print(f"{name:<10} {value:>8.4f}  {out.implementations[name]}")
    print(
        f"{out.num_reports} reports ({out.num_empty} empty, {len(missing)} missing), protocol {out.protocol}"
    )
    for note in out.notes:
        print(f"note: {note}")
    _write(result, args.output)
    return 0


def _run_fid(args) -> int:
    from medim.evaluation import fid

    out = fid(args.real, args.fake, weights=args.weights, batch_size=args.batch_size, device=args.device)
    print(f"FID {out.fid:.4f}  (N real {out.num_real}, N generated {out.num_generated}, {out.extractor})")
    _write(out.to_dict(), args.output)
    return 0


def run(args: argparse.Namespace) -> int:
    return _run_reports(args) if args.what == "reports" else _run_fid(args)

"""`medim evaluate reports|fid|diversity|is|pairs`: score what `medim generate` wrote.

Reports are read from a folder of `.txt` files (id = file stem), a `manifest.jsonl` (one JSON object
per line with "report" and an "id" or a file name), or a folder holding a `manifest.jsonl`;
predictions are matched to references by id. Image-report pairs are read from a `medim generate`
folder (its `manifest.jsonl`) or the release's layout (`image_<i>.png` + `text_<i>.txt`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from medim.commands.common import RESULT_KEY, add_hub_arguments, check_output_file, device_option, hub_options
from medim.commands.manifest import is_header

CSV_HEADER = "image,score,answer"  # the first row of `evaluate pairs --csv`

HELP = "score generated reports (BLEU/ROUGE/METEOR/CIDEr-D) or images (FID, IS, VLM-judged pair match)"

logger = logging.getLogger(__name__)

_NAME_KEYS = ("id", "file_name", "file", "report_file", "image")
_DEVICE_HELP = "default: cuda if available, else cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    _add_reports_parser(sub)
    _add_fid_parser(sub)
    _add_diversity_parser(sub)
    _add_is_parser(sub)
    _add_pairs_parser(sub)


def _add_reports_parser(sub) -> None:
    rep = sub.add_parser("reports", help="report metrics", description="report metrics")
    rep.add_argument("--pred", required=True, help="folder of .txt reports, or manifest.jsonl")
    rep.add_argument("--ref", required=True, help="folder of .txt reports, or manifest.jsonl")
    rep.add_argument(
        "--protocol", choices=("medim", "coco"), default="medim",
        help="medim: the paper's per-report NLTK metrics; coco: the COCO toolkit's corpus metrics (default: medim)"
    )
    rep.add_argument("--wordnet", default=None,
                     help="WordNet folder for the medim protocol's METEOR (default: a local WordNet 3.0, see "
                          "docs/evaluation.md), or 'none' to skip METEOR under either protocol")
    rep.add_argument("--output", default=None, help="write the result as JSON here")
    _add_clinical_arguments(rep)


def _add_fid_parser(sub) -> None:
    img = sub.add_parser(
        "fid", help="FID between two image folders", description="FID (pytorch-fid defaults)"
    )
    img.add_argument("--real", required=True, help="folder of real images")
    img.add_argument("--fake", required=True, help="folder of generated images")
    img.add_argument(
        "--weights", default=None,
        help="inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (required); rad-dino: a folder or "
        "Hub id of microsoft/rad-dino (default: that id, from the Hub cache with HF_HUB_OFFLINE=1)",
    )
    img.add_argument(
        "--features", choices=("inception", "rad-dino"), default="inception",
        help="the encoder: the FID Inception-v3 (default) or RAD-DINO (Frechet distance on radiology features)",
    )
    img.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: 50)")
    img.add_argument("--device", default=None, help=_DEVICE_HELP)
    img.add_argument("--output", default=None, help="write the result as JSON here")


def _add_is_parser(sub) -> None:
    is_ = sub.add_parser(
        "is", help="Inception Score of an image folder",
        description="Inception Score the release's way (is_score.py): the folder's PNGs in name order, "
        "256x256 bicubic, [-1, 1], 299x299 bilinear, torchvision's ImageNet Inception-v3, N // splits "
        "images per part (the remainder is dropped), mean and std over parts.",
    )
    is_.add_argument("--images", required=True, help="folder of .png images (e.g. a medim generate --out)")
    is_.add_argument(
        "--weights", default=None,
        help="torchvision's inception_v3_google-0cc3c7bd.pth (default: that file in torch's hub cache, "
        "$TORCH_HOME/hub/checkpoints; never downloaded)",
    )
    is_.add_argument("--splits", type=int, default=10, help="consecutive parts (default: 10, the release's)")
    is_.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default: 50)")
    is_.add_argument("--device", default=None, help=_DEVICE_HELP)
    is_.add_argument("--output", default=None, help="write the result as JSON here")


def _add_pairs_parser(sub) -> None:
    pairs = sub.add_parser(
        "pairs", help="image-report match judged by a vision-language model (Qwen2-VL)",
        description="Asks a Qwen2-VL judge, for each image-report pair, for a matching score from 0 to 1 "
        "(the release's pair_metric.py); reports the mean over answers holding a number.",
    )
    pairs.add_argument(
        "--dir", required=True,
        help="a medim generate folder (manifest.jsonl) or the release's layout (image_<i>.png + text_<i>.txt)",
    )
    pairs.add_argument(
        "--judge", default="Qwen/Qwen2-VL-7B-Instruct",
        help="Hub id or local folder of a Qwen2-VL-compatible model (default: Qwen/Qwen2-VL-7B-Instruct)",
    )
    pairs.add_argument("--batch-size", type=int, default=8, help="pairs per generate call (default: 8)")
    pairs.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default: 128)")
    pairs.add_argument("--device", default=None, help=_DEVICE_HELP)
    pairs.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"), default=None,
        help="judge weights dtype (default: float16 on cuda, the release's; float32 on cpu)",
    )
    pairs.add_argument("--prompt", default=None,
                       help="the question after the image, with {report} (default: the release's)")
    pairs.add_argument("--pattern", default=None,
                       help="regular expression whose first match is the score (default: the release's)")
    pairs.add_argument("--output", default=None, help="write the summary as JSON here")
    pairs.add_argument(
        "--csv", default=None, help="write per-pair scores and answers here (default: --output with .csv)"
    )
    add_hub_arguments(pairs, "--judge")


def _add_diversity_parser(sub) -> None:
    div = sub.add_parser(
        "diversity", help="sample diversity: mean pairwise MS-SSIM of an image folder",
        description="Mean MS-SSIM (pytorch-msssim) over pairs of the folder's images; lower is more diverse.",
    )
    div.add_argument("--images", required=True, help="folder of generated images")
    div.add_argument("--size", type=int, default=256, help="side images are compared at (default: 256, > 160)")
    div.add_argument("--max-pairs", type=int, default=5000, help="pairs drawn when there are more (default: 5000)")
    div.add_argument("--seed", type=int, default=0, help="which pairs are drawn (default: 0)")
    div.add_argument("--output", default=None, help="write the result as JSON here")


def _add_clinical_arguments(rep: argparse.ArgumentParser) -> None:
    rep.add_argument(
        "--metrics", default=None,
        help="comma-separated, from bleu,rouge,meteor,cider (coco),chexbert,radgraph (default: the protocol's)",
    )
    rep.add_argument(
        "--chexbert-weights", default=None,
        help="chexbert.pth (or a folder / Hub id holding it; default: StanfordAIMI/RRG_scorers from the Hub cache)",
    )
    rep.add_argument(
        "--chexbert-tokenizer", default=None,
        help="folder or Hub id of BERT-base-uncased's tokenizer and config (default: bert-base-uncased)",
    )
    rep.add_argument(
        "--radgraph-dir", default=None,
        help="folder holding <model>/ (config.json, vocabulary/, weights.th) of the radgraph package "
        "(default: its cache)",
    )
    rep.add_argument(
        "--radgraph-model", choices=("radgraph", "radgraph-xl", "modern-radgraph-xl"), default="radgraph-xl",
        help="which RadGraph model (default: radgraph-xl, the package's)",
    )
    rep.add_argument("--device", default=None, help=_DEVICE_HELP + " (CheXbert, RadGraph)")


def _clinical_options(args) -> tuple[list[str] | None, dict]:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    if metrics == []:
        raise ValueError(f"--metrics {args.metrics!r} names no metric; leave it out for the protocol's")
    chexbert = {"weights": args.chexbert_weights, "tokenizer": args.chexbert_tokenizer, "device": args.device}
    radgraph = {"model_dir": args.radgraph_dir, "model_type": args.radgraph_model, "device": args.device}
    clinical = {
        "chexbert": {k: v for k, v in chexbert.items() if v is not None},
        "radgraph": {k: v for k, v in radgraph.items() if v is not None},
    }
    return metrics, {k: v for k, v in clinical.items() if metrics and k in metrics}


def _text(path: Path) -> str:
    """A UTF-8 text file's contents; an error names the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None


def read_reports(source: str | Path) -> dict[str, str]:
    """id -> report text from a folder of .txt files, a manifest.jsonl, or a folder holding one
    (including `medim generate`'s, whose "report" field names each sample's .txt file)."""
    from medim.data.datasets import iter_jsonl

    path = Path(source).expanduser()
    if path.is_dir() and (path / "manifest.jsonl").is_file():
        path = path / "manifest.jsonl"
    if path.is_dir():
        reports = {p.stem: _text(p).strip() for p in sorted(path.glob("*.txt"))}
        if not reports:
            raise ValueError(f"{path} holds no .txt reports and no manifest.jsonl")
        return reports
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a folder or a manifest.jsonl")
    reports = {}
    for n, row in iter_jsonl(path):
        if is_header(row) or isinstance(row, dict) and row.get("error"):
            continue  # a sample `medim generate` skipped (e.g. an unreadable image): nothing to score
        report = row.get("report") if isinstance(row, dict) else None
        sample_file = path.parent / report if isinstance(report, str) and report.endswith(".txt") else None
        if sample_file is not None and sample_file.is_file():
            # A `medim generate` manifest: "report" names the sample's file; its stem is the id.
            key, text = str(row.get("id", sample_file.stem)), _text(sample_file)
        else:
            name = next((k for k in _NAME_KEYS if isinstance(row, dict) and row.get(k) is not None), None)
            if name is None or not isinstance(report, str):
                raise ValueError(f"{path}:{n} needs a 'report' string and one of {_NAME_KEYS}")
            # An "id" is used as is; a file name matches the stem of a .txt report.
            key, text = (str(row[name]) if name == "id" else Path(str(row[name])).stem), report
        if key in reports:
            raise ValueError(f"{path}:{n} repeats id {key!r}")
        reports[key] = text.strip()
    return reports


def read_pairs(folder: str | Path) -> tuple[list[Path], list[str], list[str]]:
    """(image paths, report texts, names) of the pairs in a folder.

    A `medim generate` folder: every manifest line, in index order; the text is the sample's report
    file ("pairs", "report" tasks) or its prompt ("image" task: the report the image was made from);
    the image is the sample's file or, for "report", its source image. Otherwise the release's layout:
    `image_<i>.png` with `text_<i>.txt`, by i; images without a text are skipped (logged)."""
    from medim.data.datasets import iter_jsonl

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--dir: {folder} is not a folder")
    images, texts, names = [], [], []
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        rows = sorted(((row.get("index", n), n, row) for n, row in iter_jsonl(manifest)
                       if isinstance(row, dict) and not is_header(row)), key=lambda r: r[:2])
        for _, n, row in rows:
            if row.get("error"):
                continue  # a sample `medim generate` skipped: nothing to judge
            image = folder / row["image"] if row.get("image") else row.get("source_image")
            if not image or not Path(image).is_file():
                raise FileNotFoundError(f"{manifest}:{n}: image {image!r} not found")
            if row.get("report"):
                text = _text(folder / row["report"])
            elif isinstance(row.get("prompt"), str):
                text = row["prompt"]
            else:
                raise ValueError(f"{manifest}:{n} has neither a 'report' file nor a 'prompt'")
            images.append(Path(image))
            texts.append(text.strip())
            names.append(Path(image).name)
    else:
        found = {}
        for p in folder.glob("image_*.png"):
            match = re.fullmatch(r"image_(\d+)\.png", p.name)
            if match:
                found[int(match.group(1))] = (p, folder / f"text_{match.group(1)}.txt")
        missing = [i for i, (_, t) in found.items() if not t.is_file()]
        if missing:
            logger.warning("%d images have no text_<i>.txt and are skipped (e.g. image_%d.png)", len(missing),
                           missing[0])
        for i in sorted(set(found) - set(missing)):
            image, text = found[i]
            images.append(image)
            texts.append(_text(text).strip())
            names.append(image.name)
    if not images:
        raise ValueError(f"--dir: {folder} holds no pairs (neither manifest.jsonl nor image_<i>.png + text_<i>.txt)")
    return images, texts, names


def _write(result: dict, output: str | None, what: str) -> None:
    if output:
        from medim.utils.hub import atomic_file

        with atomic_file(output) as f:  # the key first: how a later run knows the file is medim's
            json.dump({RESULT_KEY: f"evaluate {what}", **result}, f, indent=2)
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
    metrics, clinical = _clinical_options(args)
    out = report_metrics(
        [preds.get(i, "") for i in ids], [refs[i] for i in ids], args.protocol, wordnet,
        metrics=metrics, clinical=clinical,
    )
    result = out.to_dict()
    result["num_missing"] = len(missing)
    width = max(10, *map(len, out.scores))
    print(f"{'metric':<{width}} {'value':>8}  implementation")
    for name, value in out.scores.items():
        print(f"{name:<{width}} {value:>8.4f}  {out.implementations[name]}")
    print(
        f"{out.num_reports} reports ({out.num_empty} empty, {len(missing)} missing), protocol {out.protocol}"
    )
    for note in out.notes:
        print(f"note: {note}")
    _write(result, args.output, "reports")
    return 0


def _run_fid(args) -> int:
    from medim.evaluation import fid

    out = fid(
        args.real, args.fake, weights=args.weights, batch_size=args.batch_size, device=args.device,
        features=args.features,
    )
    label = "FID" if args.features == "inception" else "FD (RAD-DINO)"
    print(f"{label} {out.fid:.4f}  (N real {out.num_real}, N generated {out.num_generated}, {out.extractor})")
    result = out.to_dict()
    result["features"] = args.features
    _write(result, args.output, "fid")
    return 0


def _run_diversity(args) -> int:
    from medim.evaluation import ms_ssim_diversity

    out = ms_ssim_diversity(args.images, size=args.size, max_pairs=args.max_pairs, seed=args.seed)
    print(f"MS-SSIM {out.ms_ssim:.4f} +- {out.std:.4f}  ({out.num_pairs} pairs of {out.num_images} images, "
          f"{out.size}x{out.size}; lower is more diverse)")
    _write(out.to_dict(), args.output, "diversity")
    return 0


def _run_is(args) -> int:
    from medim.evaluation import inception_score

    out = inception_score(
        args.images, weights=args.weights, splits=args.splits, batch_size=args.batch_size, device=args.device
    )
    print(f"IS {out.mean:.4f} +- {out.std:.4f}  ({out.num_scored} of {out.num_images} images, "
          f"{out.splits} splits, {out.classifier})")
    _write(out.to_dict(), args.output, "is")
    return 0


def _run_pairs(args) -> int:
    import csv

    import torch

    from medim.evaluation.pair_match import PROMPT, SCORE_PATTERN, pair_match
    from medim.utils.hub import atomic_file

    csv_path = args.csv or (str(Path(args.output).with_suffix(".csv")) if args.output else None)
    images, reports, names = read_pairs(args.dir)
    # pair_match checks every input before it loads the judge.
    out = pair_match(
        images, reports, judge=args.judge, prompt=args.prompt or PROMPT, pattern=args.pattern or SCORE_PATTERN,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None, hub=hub_options(args),
    )
    mean = "n/a" if out.mean is None else f"{out.mean:.4f}"
    print(f"pair match {mean}  ({out.num_scored} of {out.num_pairs} pairs scored, judge {out.judge})")
    result = out.to_dict(per_pair=False)
    result["dir"] = str(args.dir)
    _write(result, args.output, "pairs")
    if csv_path:
        with atomic_file(csv_path, "w") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER.split(","))
            writer.writerows([n, "" if s is None else s, a] for n, s, a in zip(names, out.scores, out.answers))
        print(f"wrote {csv_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    for option in ("output", "csv"):  # checked before any compute
        path = getattr(args, option, None)
        if path:
            check_output_file(path, f"--{option}", CSV_HEADER if option == "csv" else None)
    if getattr(args, "device", None):
        device_option(args.device)  # a device torch does not know or this machine lacks, before any compute
    if args.what == "pairs" and args.output and not args.csv:  # the CSV beside --output
        check_output_file(Path(args.output).with_suffix(".csv"), "--output (its .csv)", CSV_HEADER)
    runners = {
        "reports": _run_reports, "fid": _run_fid, "diversity": _run_diversity, "is": _run_is, "pairs": _run_pairs,
    }
    return runners[args.what](args)

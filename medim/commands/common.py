"""What several commands share: the Hub options (`--revision`, `--cache-dir`, `--local-files-only`,
`--token`), the pipeline to load (`--model`, `--loader`, `--device`, `--dtype`) and loading it,
expanding `--images`-style glob patterns, and reading a UTF-8 file of one text a line."""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path


def add_hub_arguments(parser: argparse.ArgumentParser, revision_of: str = "the model") -> None:
    """Add the Hub options; `revision_of` says which input `--revision` applies to."""
    parser.add_argument("--revision", default=None, help=f"Hub revision (branch, tag or commit) of {revision_of}")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the cache")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--model`, `--loader`, the Hub options, `--device` and `--dtype` (read by `load_pipeline`)."""
    parser.add_argument("--model", default="medim-demo",
                        help="a saved MeDiMPipeline (folder or Hub repo), the bundled 'medim-demo', or with "
                             "--loader original the released checkpoint (e.g. JiaMao/medim_ckpts)")
    parser.add_argument("--loader", choices=("pretrained", "original"), default="pretrained",
                        help="how to read --model: MeDiMPipeline.from_pretrained, or from_original for the "
                             "released checkpoint and its upstream parts")
    add_hub_arguments(parser, "--model")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")


def load_pipeline(args: argparse.Namespace, command: str):
    """The pipeline `add_pipeline_arguments`' options name; a load error exits naming --model."""
    import torch

    from medim.pipelines.pipeline import MeDiMPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    load = MeDiMPipeline.from_original if args.loader == "original" else MeDiMPipeline.from_pretrained
    try:
        return load(args.model, dtype=dtype, device=device, **hub_options(args).kwargs())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{command}: cannot load --model {args.model}: {e}") from None


def hub_options(args: argparse.Namespace):
    """The parsed Hub options as a `medim.utils.hub.HubOptions`."""
    from medim.utils.hub import HubOptions

    return HubOptions(args.revision, args.cache_dir, args.local_files_only, args.token)


def expand_globs(patterns: list[str], option: str) -> list[str]:
    """Files matching each pattern (sorted per pattern, in the order given); a pattern matching
    nothing is an error naming `option`."""
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise SystemExit(f"{option}: nothing matches {pattern!r}")
        paths.extend(matched)
    return paths


def read_lines(path: Path, option: str, what: str = "prompt") -> list[str]:
    """The non-blank lines of a UTF-8 text file (a BOM is allowed), stripped; errors name `option`,
    the file and, for bytes that are not UTF-8, the line."""
    if not path.is_file():
        raise SystemExit(f"{option}: {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SystemExit(f"{option}: {path} line {line} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "save the file as UTF-8") from None
    lines = [t for t in (line.strip() for line in text.splitlines()) if t]
    if not lines:
        raise SystemExit(f"{option}: {path} holds no {what}")
    return lines


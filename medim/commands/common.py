"""What several commands share: the Hub options (`--revision`, `--cache-dir`, `--local-files-only`,
`--token`), expanding `--images`-style glob patterns, and reading a UTF-8 file of one text a line."""

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


def hub_options(args: argparse.Namespace):
    """The parsed Hub options as a `medim.hub.HubOptions`."""
    from medim.hub import HubOptions

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


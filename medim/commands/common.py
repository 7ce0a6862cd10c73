"""Options several commands share: where Hub files come from (`--revision`, `--cache-dir`,
`--local-files-only`, `--token`)."""

from __future__ import annotations

import argparse


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

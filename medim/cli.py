"""`medim` command line: one subcommand per job, each defined in `medim/commands/<name>.py`.

A command module provides `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Every
command module is imported to build the parser, so none imports torch or transformers at module
level (they load inside `run`): `medim --help` stays fast (checked by tests/unit/test_structure.py).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module under medim.commands; each module documents its own options.
COMMANDS: dict[str, str] = {"evaluate": "evaluate", "generate": "generate", "train": "train", "cache": "cache",
                           "convert": "convert", "demo": "demo", "app": "app", "score": "score"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medim",
        description="MeDiM: unified medical image and report generation with discrete diffusion.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"medim.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from medim import DISTRIBUTION, __version__

    return f"{DISTRIBUTION} {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # huggingface_hub's logger has a handler of its own; passed on to the root's too, it says everything twice.
    logging.getLogger("huggingface_hub").propagate = False
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`medim` command line: one subcommand per job, each defined in `medim/commands/<name>.py`.

A command module provides `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`. Every
command module is imported to build the parser, so none imports torch or transformers at module
level (they load inside `run`): `medim --help` stays fast (checked by tests/unit/test_structure.py).

`main` is the one error boundary: an expected error (`EXPECTED`: a bad input, file or setting)
exits non-zero with `medim COMMAND: message`, an unexpected one says it is a bug; `medim --debug`
(or MEDIM_DEBUG=1) lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from medim.utils.errors import REPORT_BUGS, MedimError

# name -> module under medim.commands; each module documents its own options.
COMMANDS: dict[str, str] = {"evaluate": "evaluate", "generate": "generate", "train": "train", "distill": "distill",
                           "cache": "cache", "convert": "convert", "demo": "demo", "app": "app", "score": "score"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medim",
        description="MeDiM: unified medical image and report generation with discrete diffusion.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable MEDIM_DEBUG=1)")
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
    if args.debug or os.environ.get("MEDIM_DEBUG", "") not in ("", "0"):
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except EXPECTED as e:
        raise SystemExit(f"medim {args.command}: {_message(e)}") from None
    except Exception as e:
        raise SystemExit(f"medim {args.command}: unexpected {type(e).__name__}: {e}\n"
                         f"This is a bug in medim: please report it at {REPORT_BUGS}, with the traceback that "
                         f"`medim --debug {args.command} ...` (or MEDIM_DEBUG=1) prints.") from None


# Errors a user can fix (a bad input, file or setting, an extra not installed): a message, no traceback.
EXPECTED = (MedimError, ValueError, OSError, ImportError)


def _message(error: BaseException) -> str:
    """The one-line message of an expected error (an OSError's file when it names one; a missing
    module with the extra that brings it where the error names none)."""
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not valid UTF-8 ({error.reason} at byte {error.start})"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, ModuleNotFoundError) and "pip install" not in str(error):
        return f"{error}; install the extra that needs it, e.g. pip install 'medim-diffusion[app]'"
    return str(error) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())

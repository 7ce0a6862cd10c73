"""The project's error type: a failure a user can fix (a bad input, file or setting), which the
command line reports as one line without a traceback (`medim.cli`)."""

from __future__ import annotations

__all__ = ["MedimError", "REPORT_BUGS"]

# Where an unexpected error (a bug) is reported (the package names no project URL yet).
REPORT_BUGS = "the issue tracker of the repository this medim came from"


class MedimError(Exception):
    """An expected failure whose message says what is wrong and what to do; `medim COMMAND` prints
    it as `medim COMMAND: message` and exits non-zero.

    Example:
        >>> raise MedimError("--out: out.txt exists and is not a folder")  # doctest: +SKIP
    """

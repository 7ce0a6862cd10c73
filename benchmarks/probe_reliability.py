"""Re-probe of issue 27: hundreds of adversarial cases, tried as a careless or hostile user would, on
the bundled demo model and the tests' tiny models in temporary folders, each classified:

- clean: a one-line error naming the input (or a correct result);
- traceback: a raw traceback reaches the user from the CLI, an error the CLI calls a bug, or an API
  exception of a type from deep inside (not ValueError / TypeError / FileNotFoundError / ...);
- unclear: a one-line error that names none of the words the case expects (the input it is about);
- silent-wrong: a bad input accepted, or a result that is not what was asked (checked per case);
- refused-valid: a valid input refused;
- data-loss: a file that was there before (and medim did not write) changed or deleted;
- outside-read: a file outside the folder given was opened (seen by a monitor on `open` / `os.open`
  and by the access time of sentinel files under each case's `outside/`);
- probe-error: the probe's own setup or check failed (a bug of this script, not of medim).

CLI cases run in-process through `medim.cli.main` with stderr captured (a few run as processes to
check the real exit path). Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/probe_reliability.py [--only GROUP] [--record] [--verbose]

It prints a table by group and class and lists every case that is not clean; `--record` appends
the table to benchmarks/RESULTS.md with the command.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import hashlib
import io
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers: the tiny model builders
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("MEDIM_DEBUG", None)

import probe_cases  # noqa: E402
import torch  # noqa: E402
from common import machine_info, report  # noqa: E402
from probe_cases import Case  # noqa: E402

CLASSES = ("clean", "traceback", "unclear", "silent-wrong", "refused-valid", "data-loss", "outside-read",
           "probe-error")
# API errors a caller can act on: the input's own fault, said in its words.
API_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
              PermissionError, ImportError)
CASE_SECONDS = 60


@dataclass
class Outcome:
    case: Case
    kind: str
    detail: str
    seconds: float = 0.0
    opened_outside: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- observing a case


class OpenMonitor:
    """Records every path opened through `open` / `io.open` / `os.open` while active."""

    def __init__(self):
        self.paths: list[str] = []
        self._saved: tuple = ()

    def _wrap(self, original):
        def opened(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.fsdecode(os.fspath(file)))
            return original(file, *args, **kwargs)

        return opened

    def __enter__(self):
        self._saved = (builtins.open, io.open, os.open)
        builtins.open = io.open = self._wrap(self._saved[0])
        os.open = self._wrap(self._saved[2])
        return self

    def __exit__(self, *exc):
        builtins.open, io.open, os.open = self._saved


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) -> a digest of its content or link target."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = "link:" + os.readlink(path)
            else:
                with contextlib.suppress(OSError):
                    found[rel] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def _age_outside(outside: Path) -> dict[str, float]:
    """Set the access time of every sentinel file under `outside` three days back (relatime then
    records any read); returns those times."""
    times = {}
    old = time.time() - 3 * 86400
    for path in outside.rglob("*") if outside.exists() else []:
        if path.is_file() and not path.is_symlink():
            os.utime(path, (old, path.stat().st_mtime))
            times[str(path)] = path.stat().st_atime
    return times


class Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise Timeout()


class StderrProxy(io.TextIOBase):
    """What logging handlers write to: whatever sys.stderr is now (redirected per case)."""

    def write(self, text):
        return sys.stderr.write(text)


# ---------------------------------------------------------------------------- running a case


def _run_cli(argv: list[str]) -> tuple[int, str, BaseException | None]:
    from medim.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
            return int(code or 0), err.getvalue(), None
        except SystemExit as e:
            message = e.code if isinstance(e.code, str) else ""
            code = 1 if isinstance(e.code, str) else int(e.code or 0)
            return code, err.getvalue() + message, None
        except (Exception, Timeout) as e:  # escaped the error boundary: a traceback in a real process
            return 1, err.getvalue() + traceback.format_exc(), e


def _run_process(argv: list[str], folder: Path) -> tuple[int, str, BaseException | None]:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "medim", *argv], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=CASE_SECONDS)
    return done.returncode, done.stderr, None


def _cli_kind(case: Case, code: int, text: str, escaped: BaseException | None) -> tuple[str, str]:
    lines = [x for x in text.strip().splitlines() if x.strip() and "it/s]" not in x and "?it/s" not in x
             and "sample/s]" not in x and "Loading weights" not in x]
    last = lines[-1] if lines else ""
    if escaped is not None or "Traceback (most recent call last)" in text or "This is a bug in medim" in text:
        start = text.find("medim ") if "This is a bug" in text else max(0, len(text) - 400)
        return "traceback", text[start:start + 400].replace("\n", " | ")
    if code == 0:
        return ("silent-wrong", "accepted: " + last[:200]) if case.expect == "error" else ("ok", last[:200])
    if case.expect == "ok":
        return "refused-valid", last[:300]
    message = next((x for x in reversed(lines) if x.startswith(("medim", "usage:")) or ": error:" in x), last)
    if case.names and not any(n.lower() in text.lower() for n in case.names):
        return "unclear", message[:300]
    return "clean", message[:300]


def _api_kind(case: Case, error: BaseException | None, result: Any) -> tuple[str, str]:
    if error is None:
        return ("silent-wrong", f"accepted: {str(result)[:160]}") if case.expect == "error" else ("ok", "")
    text = f"{type(error).__name__}: {error}".replace("\n", " | ")[:300]
    if isinstance(error, Timeout):
        return "traceback", f"still running after {CASE_SECONDS} s"
    from medim.utils.errors import MedimError

    own = type(error).__module__.startswith("medim.")  # medim's own error types name what they are about
    if not (isinstance(error, (*API_ERRORS, MedimError)) or own):
        return "traceback", text
    if case.expect == "ok":
        return "refused-valid", text
    if case.names and not any(n.lower() in str(error).lower() for n in case.names):
        return "unclear", text
    return "clean", text


def run_case(case: Case, root: Path) -> Outcome:
    """Run `case` in a folder of its own under `root`; a failure of the probe itself (its setup or
    check) is a "probe-error", never counted against medim."""
    try:
        return _run_case(case, root)
    except Exception:
        return Outcome(case, "probe-error", traceback.format_exc()[-600:].replace("\n", " | "))


def _run_case(case: Case, root: Path) -> Outcome:
    folder = Path(tempfile.mkdtemp(prefix=f"{case.group}-", dir=root))
    (folder / "outside").mkdir()
    (folder / "outside" / "secret.txt").write_text("a sentinel outside every folder given to medim\n")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        action = case.setup(folder)
        before = {k: v for k, v in _files(folder).items() if not any(Path(k).match(g) for g in case.owned)}
        aged = _age_outside(folder / "outside")
        start = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        monitor = OpenMonitor()
        try:
            with monitor:
                if isinstance(action, list):
                    code, text, escaped = (_run_process(action, folder) if case.process else _run_cli(action))
                    kind, detail = _cli_kind(case, code, text, escaped)
                    result = code
                else:
                    error = result = None
                    try:
                        with contextlib.redirect_stderr(io.StringIO()):
                            result = action()
                    except (Exception, Timeout) as e:
                        error = e
                    kind, detail = _api_kind(case, error, result)
        finally:
            signal.alarm(0)
        seconds = time.perf_counter() - start
        if kind == "ok":
            problem = case.check(folder, result) if case.check else None
            kind, detail = ("silent-wrong", problem) if problem else ("clean", "ok")
        outside = str(folder / "outside")
        opened = sorted({p for p in monitor.paths if os.path.realpath(p).startswith(outside)})
        read = [p for p, t in aged.items() if Path(p).exists() and Path(p).stat().st_atime != t]
        after = _files(folder)
        lost = [k for k, v in before.items() if after.get(k) != v]
        if opened or read:
            kind, detail = "outside-read", f"read {sorted(set(opened) | set(read))[:3]}; {detail}"
        elif lost:
            kind, detail = "data-loss", f"changed or deleted {lost[:4]}; {detail}"
        return Outcome(case, kind, detail, seconds, opened)
    finally:
        os.chdir(cwd)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run only the groups whose name starts with this")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--verbose", action="store_true", help="print every case as it runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(stream=StderrProxy(), level=logging.WARNING)
    signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="medim-probe-") as tmp:
        root = Path(tmp)
        for case, kind in probe_cases.control_cases():  # the detectors work, or nothing below means anything
            seen = run_case(case, root)
            if seen.kind != kind:
                raise SystemExit(f"probe control {case.name!r}: classified {seen.kind} ({seen.detail}), not {kind}")
        cases = [c for c in probe_cases.all_cases(root / "shared")
                 if args.only is None or c.group.startswith(args.only)]
        for i, case in enumerate(cases):
            outcome = run_case(case, root)
            outcomes.append(outcome)
            if args.verbose or outcome.kind != "clean":
                print(f"[{i + 1}/{len(cases)}] {case.group} / {case.name}: {outcome.kind} "
                      f"({outcome.seconds:.1f} s) {outcome.detail}", flush=True)
    minutes = (time.perf_counter() - start) / 60
    rows = []
    for group in dict.fromkeys(o.case.group for o in outcomes):
        counts = Counter(o.kind for o in outcomes if o.case.group == group)
        rows.append({"group": group, "cases": sum(counts.values()), **{k: counts.get(k, 0) for k in CLASSES}})
    counts = Counter(o.kind for o in outcomes)
    rows.append({"group": "all", "cases": len(outcomes), **{k: counts.get(k, 0) for k in CLASSES}})
    bad = [f"{o.case.group} / {o.case.name}: {o.kind}: {o.detail}" for o in outcomes if o.kind != "clean"]
    notes = [f"{len(outcomes)} cases in {minutes:.1f} min", *bad]
    report("Reliability re-probe (probe_reliability.py, issue 27)", {"threads": args.threads, "only": args.only},
           rows, machine_info("cpu"), notes, results=probe_cases.RESULTS if args.record else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""README.md as runnable sections: its code blocks, the extra each section needs, and how a block runs.

A section is a `##` or `###` heading and the text up to the next one. A section whose commands need
an optional extra says so on the line under its heading: "Needs: `pip install 'medim-diffusion[eval]'`".
Bash blocks run line by line through the shell; install and test-suite lines are left out (CI runs
those itself, .ci/run). Shared by tests/integration/test_readme.py (the dev install, every section)
and .ci/readme_sections.py (a wheel install, the sections whose extras are installed). Stdlib only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^#{2,3} (.+)$", re.M)
NEEDS = re.compile(r"^Needs: `pip install 'medim-diffusion\[([\w,]+)\]'`", re.M)
SKIPPED = ("pip install", "python -m pytest", "bash .ci/run", "medim app")  # installs, the suite, a server
# What a base install cannot run, and the extra that brings it (checked by tests/integration/test_readme.py).
COMMAND_EXTRAS = {"medim evaluate": "eval", "report_metrics": "eval", "medim train": "train", "medim distill": "train",
                  "-m medim.training": "train", "medim app": "app"}


@dataclass(frozen=True)
class Section:
    title: str
    text: str
    needs: tuple[str, ...]  # extras named by its "Needs:" line
    blocks: tuple[tuple[str, str], ...]  # (language, body)


def sections(text: str | None = None) -> list[Section]:
    text = README.read_text() if text is None else text
    heads = list(HEADING.finditer(text))
    out = []
    for head, after in zip(heads, [*heads[1:], None]):
        body = text[head.end():after.start() if after else len(text)]
        needs = NEEDS.match(body.lstrip("\n"))
        out.append(Section(head.group(1), body, tuple(needs.group(1).split(",")) if needs else (),
                           tuple(BLOCK.findall(body))))
    return out


def commands(body: str) -> list[str]:
    """The lines of a bash block to run: continuations joined, comments and skipped lines left out."""
    joined = body.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith(("#", *SKIPPED))]


def run_bash(body: str, cwd: Path, env: dict[str, str]) -> int:
    """Run a bash block's commands in `cwd`; raises AssertionError naming the first that fails."""
    ran = 0
    for command in commands(body):
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stderr[-3000:]}"
        ran += 1
    return ran


def run_python(body: str, cwd: Path, env: dict[str, str], name: str) -> None:
    """Run a python block as a script of its own in `cwd` (so `import medim` finds the installed one)."""
    script = cwd / f"{name}.py"
    script.write_text(body)
    done = subprocess.run([sys.executable, script.name], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"README block {name} failed:\n{body}\n{done.stderr[-3000:]}"

"""Every code block of README.md runs as written, against the bundled demo model, in a fresh folder.

Python blocks run in their own namespace; bash blocks run line by line through the shell. Only the
install and test-suite lines are left out: CI runs exactly those itself (.ci/run).
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SKIPPED = ("pip install", "python -m pytest", "bash .ci/run")


def blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall((REPO / "README.md").read_text()) if lang == kind]


def commands(body: str) -> list[str]:
    joined = body.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith(("#", *SKIPPED))]


def test_readme_is_short_and_has_its_blocks():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 3


@pytest.mark.slow
def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    bindir = Path(sys.executable).parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    ran = 0
    for body in blocks("bash"):
        for command in commands(body):
            done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"README command failed: {command}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 6
    for i, body in enumerate(blocks("python")):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(body)
        runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "nodule.png").is_file() and (tmp_path / "runs/tiny/final/model_index.json").is_file()

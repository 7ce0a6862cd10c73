"""Every code block of README.md runs as written, against the bundled demo model, in a fresh folder,
and every section that needs an optional extra names it (tests/helpers/readme.py: the convention).

Only the install and test-suite lines are left out: CI runs exactly those itself (.ci/run), and runs
the README again on the installed wheel, each section after installing only the extra it names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers.readme import COMMAND_EXTRAS, README, commands, run_bash, run_python, sections


def test_readme_is_short_and_has_its_blocks():
    assert len(README.read_text().splitlines()) <= 200
    blocks = [block for section in sections() for block in section.blocks]
    assert sum(lang == "python" for lang, _ in blocks) >= 4 and sum(lang == "bash" for lang, _ in blocks) >= 3


def test_every_section_names_the_extra_its_commands_need():
    needing = {}
    for section in sections():
        code = "\n".join(body for _, body in section.blocks)
        extras = {extra for command, extra in COMMAND_EXTRAS.items() if command in code}
        assert extras <= set(section.needs), f"README section {section.title!r} runs commands that need {extras}"
        needing.update(dict.fromkeys(section.needs, section.title))
    assert {"eval", "train", "app"} <= set(needing)


def test_needs_lines_are_read():
    text = "## A\n\nNeeds: `pip install 'medim-diffusion[eval,coco]'`\n\n```bash\nmedim evaluate x\n```\n## B\ntext\n"
    a, b = sections(text)
    assert (a.title, a.needs, b.needs) == ("A", ("eval", "coco"), ())
    assert commands(a.blocks[0][1]) == ["medim evaluate x"]


@pytest.mark.slow
def test_readme_blocks_run(tmp_path):
    (tmp_path / "configs").symlink_to(README.parent / "configs")
    bindir = Path(sys.executable).parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path),
           "PYTHONPATH": str(README.parent)}
    ran = 0
    for i, (lang, body) in enumerate(block for section in sections() for block in section.blocks):
        if lang == "bash":
            ran += run_bash(body, tmp_path, env)
        elif lang == "python":
            run_python(body, tmp_path, env, f"readme_block_{i}")
    assert ran >= 6
    assert (tmp_path / "nodule.png").is_file() and (tmp_path / "runs/tiny/final/model_index.json").is_file()

"""Run README.md's code blocks, section by section, against the medim installed in this interpreter.

    python .ci/readme_sections.py                # the sections that need no extra
    python .ci/readme_sections.py --extra eval   # the sections whose "Needs:" line names eval

Run it from an empty folder outside the repository (the blocks write there; `import medim` must
find the installed package, not the source tree); .ci/wheel runs it once per extra, in one folder,
so a section can use what an earlier one wrote. The convention and the block runner live in
tests/helpers/readme.py (stdlib only), shared with tests/integration/test_readme.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", default=None,
                        help="run the sections that need this extra (default: those that need none)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # for tests.helpers.readme only; the blocks run in subprocesses in the cwd
    from tests.helpers.readme import run_bash, run_python, sections

    cwd = Path.cwd()
    if cwd == REPO or REPO in cwd.parents:
        raise SystemExit("run it from a folder outside the repository")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    chosen = [s for s in sections() if (args.extra in s.needs if args.extra else not s.needs)]
    for section in chosen:
        for i, (lang, body) in enumerate(section.blocks):
            if lang == "bash":
                run_bash(body, cwd, env)
            elif lang == "python":
                run_python(body, cwd, env, f"readme_{'_'.join(section.title.lower().split())}_{i}")
        print(f"README: {section.title!r} ran ({len(section.blocks)} blocks)", flush=True)
    if args.extra and not chosen:
        raise SystemExit(f"no README section names the extra {args.extra!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

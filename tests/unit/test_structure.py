"""The shape of the code base: layers import only downwards, no import cycles, modules that say what
they hold, functions one can read on a screen, and a command line whose `--help` does not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "medim"
# A function a reader sees on one screen, called with its arguments named past the first few.
MAX_FUNCTION_LINES = 80
MAX_POSITIONAL = 6

# Bottom to top (docs/architecture.md). A module may import its own layer and the ones below.
LAYERS = [
    ["medim", "medim.utils"],
    ["medim.diffusion"],
    ["medim.layout"],
    ["medim.models", "medim.data"],
    ["medim.data.cache"],
    ["medim.pipelines"],
    ["medim.training", "medim.evaluation"],
    ["medim.demo", "medim.app"],
    ["medim.commands", "medim.cli", "medim.__main__", "medim.training.__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str, known: dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every medim module `name` imports, at any depth of the file (function-level imports
    included, `if TYPE_CHECKING:` blocks excluded), with the packages whose __init__ runs first."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []
    package = name if is_package(name, known) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] != "medim":
                continue
            while target not in known:  # `import medim.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            found.add(target)
            parent = target.rpartition(".")[0]
            while parent and not name.startswith(parent + ".") and parent != name:
                if is_package(parent, known):
                    found.add(parent)  # importing a.b.c runs a.b's __init__ first
                parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


def layer(name: str) -> int:
    best, rank = -1, None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} belongs to no layer in tests/unit/test_structure.py LAYERS"
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_cycles(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_only_downwards(graph):
    upward = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph.items() for b in deps
              if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)
    demo_users = [a for a, deps in graph.items() if any(d.startswith("medim.demo") for d in deps)
                  and not a.startswith(("medim.demo", "medim.commands", "medim.cli", "medim.app"))]
    assert not demo_users, f"only the demo, the app and the commands may import medim.demo: {demo_users}"


def test_modules_say_what_they_hold():
    for path in modules().values():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path} has no opening docstring"


def test_functions_are_short_with_few_positional_parameters():
    long, wide = [], []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}"
            length = node.end_lineno - node.lineno + 1  # docstring included
            if length > MAX_FUNCTION_LINES:
                long.append(f"{where} ({length} lines)")
            positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                wide.append(f"{where} ({len(positional)} positional parameters)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
    assert not wide, (f"functions with more than {MAX_POSITIONAL} positional parameters (make the rest "
                      "keyword-only):\n" + "\n".join(wide))


def test_help_does_not_load_torch():
    code = "import sys; from medim.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "building the `medim` parser imported torch"

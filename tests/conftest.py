"""The tiny world the tests share, built once per session (tests/helpers/ holds the builders).

Shared objects are read-only: a test that changes a pipeline (assigns sampler_config, calls .to(),
patches a method other than through `tests.helpers.editing.fail_if_called`) builds its own, and
each fixture checks at the end of the session that nothing changed what it handed out.
- `upstream`: the upstream-format files the loaders read (tests/helpers/pipeline.py `write_upstream`).
- `native`, `v1`: a random tiny pipeline per layout with a 4-step sampler (tests/helpers/editing.py);
  tests/integration/test_pipeline.py overrides both with the pipelines its loaders make of `upstream`.
- `tiny_run_copy`: puts a copy of the trainer tests' saved pipeline and token cache in `tmp_path`
  (tests/helpers/training.py `tiny_run` then finds them instead of building them).
Tests under tests/integration/ are marked `integration` (`-m "not integration"` runs the unit tests).
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

# Tests never touch the network: everything they load is written by the tests themselves. (Set
# before huggingface_hub is imported, which reads them once: the builders are imported in fixtures.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def folder_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pipeline_digest(pipe) -> tuple:
    """What a test could change in a pipeline: its weights (values, dtypes, devices), its sampler
    settings and the attributes set on it, its model or its VQGAN."""
    weights = hashlib.sha256()
    for module in (pipe.model, pipe.vqgan):
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            weights.update(f"{name} {flat.dtype} {flat.device}".encode())
            weights.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return weights.hexdigest(), repr(pipe.sampler_config), *(sorted(vars(x)) for x in (pipe, pipe.model, pipe.vqgan))


def shared(name: str, build, digest):
    """Yield `build()`, then fail the session if a test changed it."""
    value = build()
    before = digest(value)
    yield value
    assert digest(value) == before, f"a test changed the shared `{name}`: such a test must build its own"


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    from tests.helpers.pipeline import write_upstream

    root = tmp_path_factory.mktemp("upstream")
    yield from shared("upstream", lambda: write_upstream(root), lambda paths: folder_digest(root))


@pytest.fixture(scope="session")
def native():
    from tests.helpers.editing import native_pipe

    yield from shared("native", native_pipe, pipeline_digest)


@pytest.fixture(scope="session")
def v1():
    from tests.helpers.editing import v1_pipe

    yield from shared("v1", v1_pipe, pipeline_digest)


@pytest.fixture(scope="session")
def tiny_run_files(tmp_path_factory):
    from tests.helpers.training import tiny_run

    root = tmp_path_factory.mktemp("tiny_run")

    def build() -> Path:
        tiny_run(root)
        return root

    yield from shared("tiny_run_files", build, folder_digest)


@pytest.fixture
def tiny_run_copy(tiny_run_files, tmp_path) -> Path:
    """`tmp_path` holding its own copy of the tiny run's `base` (saved pipeline) and `cache`."""
    for name in ("base", "cache"):
        shutil.copytree(tiny_run_files / name, tmp_path / name)
    return tmp_path

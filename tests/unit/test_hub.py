from pathlib import Path

import pytest

from medim.utils.hub import atomic_directory, resolve_file, resolve_snapshot


def test_atomic_directory_replaces_only_on_success(tmp_path: Path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"

    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(target):
            pass

    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_resolve_local(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.json").write_text("{}")
    assert resolve_file(tmp_path, "f.json", subfolder="sub") == tmp_path / "sub" / "f.json"
    assert resolve_snapshot(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError):
        resolve_file(tmp_path, "missing.json")
    with pytest.raises(FileNotFoundError):
        resolve_file(tmp_path / "nope.ckpt")

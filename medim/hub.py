"""Where files come from and how they are written.

Every loader in medim takes either a local path or a Hugging Face Hub repo id. Hub downloads go
through `huggingface_hub` (so `HF_HUB_OFFLINE=1` and the usual cache work), fetching only the files
that are needed. Every saver writes into a temporary sibling folder and renames it into place, so a
crash never leaves a half-written artefact behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download

__all__ = ["resolve_file", "resolve_snapshot", "atomic_directory", "atomic_file"]


def _hub_kwargs(revision, cache_dir, local_files_only, token, repo_type) -> dict:
    return dict(
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        repo_type=repo_type,
    )


def resolve_file(
    repo_or_path: str | os.PathLike,
    filename: str | None = None,
    *,
    subfolder: str | None = None,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Return a local path to one file.

    `repo_or_path` may be a file, a directory holding `subfolder/filename`, or a Hub repo id
    (downloaded with `hf_hub_download`). Raises FileNotFoundError naming what was looked for.
    """
    path = Path(repo_or_path).expanduser()
    if path.is_file() and filename is None:
        return path
    if path.is_dir():
        if filename is None:
            raise ValueError(f"{path} is a directory: name the file to read inside it")
        candidate = path / (subfolder or "") / filename
        if not candidate.is_file():
            raise FileNotFoundError(f"{candidate} does not exist")
        return candidate
    if path.exists() or str(repo_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_or_path} is not a file or directory")
    if filename is None:
        raise ValueError(f"{repo_or_path!r} looks like a Hub repo id: name the file to download")
    return Path(
        hf_hub_download(
            str(repo_or_path),
            filename,
            subfolder=subfolder,
            **_hub_kwargs(revision, cache_dir, local_files_only, token, repo_type),
        )
    )


def resolve_snapshot(
    repo_or_path: str | os.PathLike,
    allow_patterns: Sequence[str] | None = None,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Return a local directory: `repo_or_path` itself if it is one, else a Hub snapshot holding
    only the files matching `allow_patterns`."""
    path = Path(repo_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(repo_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_or_path} is not a directory")
    return Path(
        snapshot_download(
            str(repo_or_path),
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            **_hub_kwargs(revision, cache_dir, local_files_only, token, repo_type),
        )
    )


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target`.

    An existing non-empty `target` is only replaced with `overwrite=True` (checked before any work).
    On an exception the temporary directory is removed and `target` is left untouched.
    """
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file next to `target` and rename it into place when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

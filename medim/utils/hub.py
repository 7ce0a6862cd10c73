"""Where files come from and how they are written: Hub/local resolution, the bundled models, atomic writes.

Every loader in medim takes either a local path or a Hugging Face Hub repo id. Hub downloads go
through `huggingface_hub` (so `HF_HUB_OFFLINE=1` and the usual cache work), fetching only the files
that are needed; the Hub options travel together as one `HubOptions`. Names of models that ship
inside the package (`medim-demo`) resolve to their folder here, below every other layer. Every
saver writes into a temporary sibling folder and renames it into place, so a crash never leaves a
half-written artefact behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, snapshot_download

__all__ = [
    "HubOptions",
    "BUNDLED_MODELS",
    "bundled_model_path",
    "resolve_file",
    "resolve_snapshot",
    "HubUnreachableError",
    "is_hub_repo_name",
    "looks_like_a_path",
    "hub_fetch_options",
    "atomic_directory",
    "atomic_file",
    "temporary_names",
    "refuse_outside_links",
    "check_replaceable",
]

# Models that ship inside the package, by the name users load them with -> folder under medim/.
BUNDLED_MODELS = {"medim-demo": "demo_model", "medim-demo-4step": "demo_model_4step"}
# Seconds the one reachability probe of the Hub may take. Without it, a machine with no route to the
# Hub spends about a minute in huggingface_hub's retries of its first request before failing.
HUB_PROBE_TIMEOUT_S = 3.0


class HubUnreachableError(ConnectionError):
    """A Hub repo was asked for, the Hub cannot be reached, and the local cache holds no copy of it."""


@dataclass(frozen=True)
class HubOptions:
    """The Hub options every `from_*` loader takes: `revision` (branch, tag or commit), `cache_dir`,
    `local_files_only` (never download) and `token`.

    Example:
        >>> hub = HubOptions(revision="v1", local_files_only=True)
        >>> resolve_file("org/repo", "config.json", hub=hub)  # doctest: +SKIP
    """

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    token: str | bool | None = None

    def without_revision(self) -> HubOptions:
        """The same options for a secondary repo: a revision names a commit of the main input only."""
        return replace(self, revision=None)

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments of huggingface_hub's download functions."""
        return asdict(self)


def bundled_model_path(name: str | os.PathLike) -> Path | None:
    """The folder of a model that ships with medim (`BUNDLED_MODELS`), or None for any other name.
    Write "./medim-demo" to mean a local folder of that name instead.

    Raises FileNotFoundError when the name is known but this build of medim holds no such model
    (e.g. a source tree without the package data)."""
    folder = BUNDLED_MODELS.get(str(name))
    if folder is None:
        return None
    path = Path(__file__).resolve().parents[1] / folder
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"this build of medim has no bundled {name!r} model ({path} is empty); build one with "
            "`medim demo --retrain DIR` (about 1 h 45 min on two CPU cores) and load DIR instead"
        )
    return path


def looks_like_a_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path: a Hub repo id is "name" or "owner/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def is_hub_repo_name(name: str | os.PathLike) -> bool:
    """Whether loading `name` asks the Hub: not a bundled model, not an existing path, not path-like."""
    text = str(name)
    return bundled_model_path(text) is None and not Path(text).expanduser().exists() and not looks_like_a_path(text)


@functools.cache
def _unreachable(endpoint: str) -> str | None:
    """Why nothing can be downloaded from `endpoint`, or None when it answers (one request, once per process)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # httpx's or requests' network errors, as the huggingface_hub version has it
        return f"the Hub cannot be reached ({endpoint}: {type(e).__name__})"
    return None


def hub_fetch_options(repo_id: str, hub: HubOptions | None = None, *, repo_type: str | None = None) -> HubOptions:
    """The options to fetch `repo_id` with: `hub` when it says `local_files_only` or the Hub answers
    a short probe; local files only when the Hub cannot be reached (or `HF_HUB_OFFLINE=1`) but the
    cache holds the repo. Otherwise HubUnreachableError, in seconds rather than the minute of
    retries huggingface_hub would spend, with a message that says what is missing.

    Example:
        >>> hub_fetch_options("JiaMao/medim_ckpts")  # doctest: +SKIP
        HubOptions(revision=None, cache_dir=None, local_files_only=False, token=None)
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    hub = hub or HubOptions()
    if hub.local_files_only:
        return hub
    reason = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    if reason is None:
        return hub
    cache = Path(hub.cache_dir or constants.HF_HUB_CACHE).expanduser()
    snapshots = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type or "model") / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return replace(hub, local_files_only=True)
    raise HubUnreachableError(f"{repo_id}: not in the local Hugging Face cache ({cache}), and {reason}")


def resolve_file(
    repo_or_path: str | os.PathLike,
    filename: str | None = None,
    *,
    subfolder: str | None = None,
    repo_type: str | None = None,
    hub: HubOptions | None = None,
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
            repo_type=repo_type,
            **hub_fetch_options(str(repo_or_path), hub, repo_type=repo_type).kwargs(),
        )
    )


def resolve_snapshot(
    repo_or_path: str | os.PathLike,
    allow_patterns: Sequence[str] | None = None,
    *,
    repo_type: str | None = None,
    hub: HubOptions | None = None,
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
            repo_type=repo_type,
            **hub_fetch_options(str(repo_or_path), hub, repo_type=repo_type).kwargs(),
        )
    )


# The temporary sibling of `name` is exactly ".<name>.tmp-<8 lowercase hex digits>".
_TEMPORARY = r"\.(?:{})\.tmp-[0-9a-f]{{8}}"


def temporary_names(names: str) -> re.Pattern:
    r"""The exact names of the temporary siblings `atomic_file`/`atomic_directory` create for targets
    whose names match the regular expression `names`: a cleanup that removes only what matches
    (`fullmatch`) never removes a user's file.

    Example:
        >>> bool(temporary_names(r"a\.png").fullmatch(".a.png.tmp-0123abcd"))
        True
    """
    return re.compile(_TEMPORARY.format(names))


def _temporary_sibling(target: Path, create: Callable[[Path], Any]) -> tuple[Path, Any]:
    """Create a fresh hidden `.<name>.tmp-<random>` next to `target` with `create` (os.mkdir or an
    os.open): a plain mkdir()/open() gets the mode the user's umask gives, where tempfile's
    mkdtemp/mkstemp would force 0700/0600 onto the finished output."""
    for _ in range(100):
        path = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary sibling of {target}")


def _umask() -> int:
    # /proc names it without changing it; os.umask can only read it by setting it for a moment.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_permissions(root: Path) -> None:
    """Give every folder and file under `root` the mode a plain mkdir()/open() gives under the umask
    (0777/0666 less the umask; executables keep their x bits): writers such as safetensors' save_file
    create their files 0600."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target`.

    An existing non-empty `target` is only replaced with `overwrite=True` (checked before any work).
    On an exception the temporary directory is removed and `target` is left untouched. What lands
    has the permissions of a plain mkdir()/open() under the user's umask.
    """
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _temporary_sibling(target, os.mkdir)
    try:
        yield tmp
        _plain_permissions(tmp)
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
    """Open a temporary file next to `target` and rename it into place when the block succeeds
    (created like a plain open(): the umask decides its permissions)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp, fd = _temporary_sibling(target, lambda p: os.open(p, flags, 0o666))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def refuse_outside_links(root: Path, names: Sequence[str], what: str) -> None:
    """Refuse (ValueError) a local folder in which one of `names`, or anything under one that is a
    folder, resolves outside `root` (a symlink to another model, to a system file): a model or
    adapter folder reads only its own files, and no outside content reaches an error message.

    Example:
        >>> refuse_outside_links(Path("adapter"), ["adapter_config.json"], "the adapter folder")
    """
    top = root.resolve()
    for name in names:
        start = root / name
        paths = [start]
        if start.is_dir() and start.resolve().is_relative_to(top):
            for folder, dirs, files in os.walk(start):
                paths += [Path(folder) / entry for entry in (*dirs, *files)]
        for path in paths:
            if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(top):
                raise ValueError(f"{root}: {path.relative_to(root)} resolves outside {what}; "
                                 "refused (only the folder's own files are read)")


def check_replaceable(target: Path, written: Path, what: str, marker: str, is_ours: Callable[[Any], bool],
                      also: re.Pattern | None = None) -> None:
    """Before a save with `overwrite=True` replaces `target` by the new save `written`: refuse
    (FileExistsError) unless `target` is empty, or is `what` (its JSON file `marker` passes
    `is_ours`) holding only files the new save writes or `also` matches: a save never deletes a
    user's file."""
    if not target.is_dir() or not any(target.iterdir()):
        return
    try:
        ours = is_ours(json.loads((target / marker).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise FileExistsError(f"{target} is not {what} (no {marker} written by medim); overwrite=True replaces only "
                              f"{what}: choose an empty or new folder")
    new = {p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file()}
    foreign = sorted(rel for p in target.rglob("*") if (p.is_file() or p.is_symlink())
                     and (rel := p.relative_to(target).as_posix()) not in new and not (also and also.fullmatch(rel)))
    if foreign:
        raise FileExistsError(f"{target} holds files a save does not write ({', '.join(foreign[:5])}); they are "
                              "left as they are: move them out, or save to an empty or new folder")

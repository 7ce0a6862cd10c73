"""Training checkpoints: written atomically with checksums, verified and found again by `resume`, pruned.

A checkpoint is a directory `checkpoint_<step:08d>/` holding only safetensors and JSON/YAML:
  model.safetensors      full (unsharded) weights; tied tensors stored once (aliases in metadata). A LoRA
                         run (`lora.r > 0`) stores its trainable weights only: the adapters and
                         `lora.modules_to_save`, by parameter name; the frozen base is `model.init`
  ema.safetensors        the EMA weights, when EMA is on
  optimizer.safetensors  AdamW state keyed "<param fqn>/<name>" (of the trainable weights), param groups in metadata
  rng.safetensors        python / numpy / torch / cuda / loss-generator RNG states of every rank
  trainer_state.json     step, applied updates, skipped steps, samples seen, world size, data identity
  config.yaml            the run's full config
  manifest.json          size and sha256 of each file above, written last
It is written into a temporary sibling folder and renamed (medim.utils.hub.atomic_directory); only then
is the `latest` pointer file replaced, so a crash at any moment leaves the previous checkpoint whole
and `latest` naming it. A checkpoint damaged later (a truncated copy, a bad disk) fails its
checksums: `find_checkpoint(root, "latest")` then warns, naming the file, and falls back to the
newest intact one, leaving the damaged one in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medim.utils.hub import atomic_directory, atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "list_checkpoints",
    "capture_rng",
    "restore_rng",
    "save_state_dict",
    "load_state_dict_file",
]

_NAME = re.compile(r"^checkpoint_(\d+)$")
LATEST = "latest"
MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json", "config.yaml")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged or unreadable; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints under `root`, oldest first (temporary folders start with '.')."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(root: str | os.PathLike, resume: str, verify: bool = True) -> Path | None:
    """Resolve `resume` to a checkpoint directory that passes `verify_checkpoint`.

    "latest": the checkpoint `root/latest` names, else the highest step; a damaged one is reported in
    a warning naming its file and the next newest is tried (nothing is deleted). None when `root`
    holds no checkpoint yet; CheckpointError when it holds only damaged ones. Any other value is an
    explicit checkpoint directory, which must be intact.
    """
    root = Path(root)
    if resume != LATEST:
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume={resume!r} is not a checkpoint directory (no trainer_state.json)")
        if verify:
            verify_checkpoint(path)
        return path
    candidates = [p for _, p in reversed(list_checkpoints(root))]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        else:
            logger.warning("%s names %s, which is gone; using the newest checkpoint instead", pointer, named)
    damaged = []
    for path in candidates:
        try:
            if verify:
                verify_checkpoint(path)
            return path
        except CheckpointError as e:
            logger.warning("%s; falling back to an older checkpoint (the damaged one is kept)", e)
            damaged.append(str(e))
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(damaged))
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)  # hashlib drops the GIL on large updates: files hash in parallel
    return digest.hexdigest()


def _hash_files(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def _write_manifest(directory: Path, step: int) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    entries = {p.name: {"bytes": p.stat().st_size, "sha256": h} for p, h in zip(files, _hash_files(files))}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": entries}, indent=2))


def _check_listed(path: Path, files: object) -> None:
    """A manifest's "files": {plain name: {"bytes": int, "sha256": str}}, every name a file of the
    checkpoint folder itself (never "../..", a subfolder, or a symlink leading out of it)."""
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged (\"files\" is a {type(files).__name__}, "
                              "not an object of file names)")
    for name, entry in files.items():
        plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name
        if not plain or (path / name).resolve().parent != path.resolve():
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists {name!r}, not a file of the checkpoint "
                                  "folder; refused")
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged (the entry of {name!r})")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of a checkpoint against the sizes and sha256 sums in its manifest.json.

    Raises CheckpointError naming the first file that is missing, of the wrong size or content.
    Cost: one read of the checkpoint (files are hashed in parallel).
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete, or written by an older medim): "
                              "its files cannot be verified") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged ({e})") from None
    _check_listed(path, files)
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no {missing}")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is damaged ({file.stat().st_size} bytes, "
                                  f"{entry['bytes']} written)")
    names = list(files)
    for name, digest in zip(names, _hash_files([path / n for n in names])):
        if digest != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is damaged (its sha256 differs from {MANIFEST})")


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors refuses shared storage: store tied tensors once and record which keys alias it."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    meta = {"aliases": json.dumps(aliases), **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)


def load_state_dict_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for key, src in json.loads(meta.get("aliases", "{}")).items():
        tensors[key] = tensors[src]
    return tensors, meta


def _flatten_optimizer(optim_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for fqn, values in optim_state["state"].items():
        for name, v in values.items():
            tensors[f"{fqn}/{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    # The trainer's learning rate is a device tensor (set every step from its schedule): store its value.
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in optim_state["param_groups"]]
    return tensors, {"param_groups": json.dumps(groups)}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = t
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """This process's RNG states as tensors + JSON-able values (no pickle)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["generator"] = generator.get_state()
    meta = {"python": [version, gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return {"tensors": tensors, "meta": meta}


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    t, meta = state["tensors"], state["meta"]
    version, gauss = meta["python"]
    random.setstate((version, tuple(t["python"].tolist()), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, t["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(t["torch"])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])
    if generator is not None and "generator" in t:
        generator.set_state(t["generator"])


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optim_state: dict,
    trainer_state: dict,
    rng_states: list[dict],
    config_yaml: str,
    ema_state: dict[str, torch.Tensor] | None = None,
    keep_last: int = 0,
) -> Path:
    """Write `root/checkpoint_<step>` atomically, point `root/latest` at it, prune to `keep_last`.

    Call on the main rank only, with full (gathered) state dicts and every rank's RNG state.
    """
    root = Path(root)
    name = checkpoint_name(step)
    with atomic_directory(root / name, overwrite=True) as tmp:
        save_state_dict(model_state, tmp / "model.safetensors", {"step": str(step)})
        if ema_state is not None:
            save_state_dict(ema_state, tmp / "ema.safetensors")
        tensors, meta = _flatten_optimizer(optim_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
        rng_tensors = {f"rank{r}.{k}": v for r, s in enumerate(rng_states) for k, v in s["tensors"].items()}
        rng_meta = {"ranks": json.dumps([s["meta"] for s in rng_states])}
        save_file(rng_tensors, str(tmp / "rng.safetensors"), metadata=rng_meta)
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _write_manifest(tmp, step)  # last: it vouches for everything above
    with atomic_file(root / LATEST) as f:
        f.write(name)
    _prune(root, keep_last, keep=root / name)
    return root / name


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    # Leftovers of a killed writer or pruner: hidden ".checkpoint_*" folders are never checkpoints.
    for p in [*root.glob(".checkpoint_*.tmp-*"), *root.glob(".checkpoint_*.del-*")]:
        shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    found = [p for _, p in list_checkpoints(root)]
    for p in found[:-keep_last]:
        if p != keep:
            # Hide it first (one rename), so a kill during the removal leaves no half-deleted checkpoint.
            hidden = p.with_name(f".{p.name}.del-{os.getpid()}")
            os.replace(p, hidden)
            shutil.rmtree(hidden, ignore_errors=True)
            logger.info("pruned old checkpoint %s", p)


def load_checkpoint(path: str | os.PathLike, rank: int = 0, verify: bool = True) -> dict:
    """Read a checkpoint written by `save_checkpoint` (checked against its manifest first unless
    `verify=False`). Returns model/ema/optimizer state dicts, the trainer state and this rank's RNG
    state (None when the checkpoint had fewer ranks). A damaged file raises CheckpointError naming it.
    """
    path = Path(path)
    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    if verify:
        verify_checkpoint(path)
    with reading(path / "model.safetensors"):
        model_state, _ = load_state_dict_file(path / "model.safetensors")
    ema_state = None
    if (path / "ema.safetensors").is_file():
        with reading(path / "ema.safetensors"):
            ema_state = load_state_dict_file(path / "ema.safetensors")[0]
    with reading(path / "optimizer.safetensors"):
        optim_tensors = load_file(str(path / "optimizer.safetensors"))
        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
            optim_state = _unflatten_optimizer(optim_tensors, f.metadata())
    with reading(path / "rng.safetensors"):
        rng_tensors = load_file(str(path / "rng.safetensors"))
        with safe_open(str(path / "rng.safetensors"), framework="pt") as f:
            rng_meta = json.loads(f.metadata()["ranks"])
    with reading(path / "trainer_state.json"):
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        step = trainer_state.get("step") if isinstance(trainer_state, dict) else None
        if type(step) is not int or step < 0:
            raise ValueError(f'"step" must be an integer >= 0, got {step!r}')
    rng = None
    if rank < len(rng_meta):
        prefix = f"rank{rank}."
        own = {k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
        rng = {"tensors": own, "meta": rng_meta[rank]}
    return {
        "model": model_state,
        "ema": ema_state,
        "optimizer": optim_state,
        "trainer_state": trainer_state,
        "rng": rng,
        "path": path,
    }


@contextlib.contextmanager
def reading(file: Path):
    """Re-raise a parse error of `file` (safetensors, JSON, a missing metadata key) as CheckpointError."""
    try:
        yield
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} is damaged or unreadable "
                              f"({type(e).__name__}: {e})") from e

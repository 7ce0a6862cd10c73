"""Resuming a run: the newest intact checkpoint (verified once, on rank 0), and the settings check that
refuses a resume which would train differently from the uninterrupted run (docs/training.md, "Resuming"),
and the rule for `train.output_dir`: written into only when it is new, empty or a run's own folder (a resume
trims log.jsonl and replaces final/, so a folder holding anything else is refused before anything loads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch.distributed as dist
import yaml

from medim.training import checkpoint as ckpt
from medim.training.config import FREE_ON_RESUME, TrainConfig, resume_differences
from medim.training.distributed import DistInfo

logger = logging.getLogger(__name__)

__all__ = ["ResumeRefused", "choose_checkpoint", "check_settings", "check_output_dir", "data_identity"]


# The inputs a checkpoint records by identity (trainer_state.json) -> the option a change is reported as
# (and that checkpoint.allow_changed names to accept it).
IDENTITY_OPTIONS = {"data": "data.cache (contents)", "teacher": "distill.teacher (weights)"}


class ResumeRefused(ValueError):
    """The checkpoint was written under settings that would make the resumed run differ."""


def data_identity(data) -> dict:
    """What the checkpoint records about the training data: the item count and, for a token cache,
    the sha256 of its index (its shards, layout and build settings), so a rebuilt cache is noticed
    even at the same path."""
    identity = {"items": len(data)}
    index = getattr(data, "index", None)
    if index is not None:
        identity["index_sha256"] = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    return identity


def choose_checkpoint(root: Path, resume: str, info: DistInfo) -> Path | None:
    """`checkpoint.find_checkpoint` on rank 0 (the checksums cost one read of the checkpoint), its
    answer or error shared with every rank so that they all resume from the same one or all stop."""
    answer: list = [None]
    if info.is_main:
        try:
            path = ckpt.find_checkpoint(root, resume)
            answer = [("path", None if path is None else str(path))]
        except (ckpt.CheckpointError, FileNotFoundError) as e:
            answer = [(type(e).__name__, str(e))]
    if info.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "CheckpointError":
        raise ckpt.CheckpointError(value)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(value)
    return None if value is None else Path(value)


def check_settings(path: Path, cfg: TrainConfig, world_size: int, identity: dict) -> list[tuple[str, object, object]]:
    """Compare this run with the one that wrote checkpoint `path`: its options (config.yaml), world
    size and the identity of its inputs (trainer_state.json; `identity`: the trainer's `_identity`,
    e.g. {"data": data_identity(data)} and, for a distillation, the teacher's weights). Raises
    ResumeRefused listing every difference that can change the trained weights and is not named in
    `checkpoint.allow_changed`; returns the allowed ones (after logging them), which the trainer
    then applies."""
    with ckpt.reading(path / "config.yaml"):
        saved = yaml.safe_load((path / "config.yaml").read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping of config sections")
    with ckpt.reading(path / "trainer_state.json"):
        state = json.loads((path / "trainer_state.json").read_text())
    changes = resume_differences(saved, cfg)
    if state.get("world_size", world_size) != world_size:
        changes.append(("world_size", state["world_size"], world_size))
    for key, now in identity.items():  # a key the checkpoint lacks was not recorded by its medim
        if key in state and state[key] != now:
            changes.append((IDENTITY_OPTIONS[key], state[key], now))
    allowed = cfg.checkpoint.allow_changed

    def is_allowed(key: str) -> bool:
        key = key.split(" ")[0]
        return any(key == a or key.startswith(a + ".") for a in allowed)

    refused = [c for c in changes if not is_allowed(c[0])]
    if refused:
        listing = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in refused)
        names = ",".join(dict.fromkeys(key.split(" ")[0] for key, _, _ in refused))
        raise ResumeRefused(
            f"checkpoint {path} was written with other settings, so the resumed run would not continue "
            f"the interrupted one:\n{listing}\nResume with the checkpoint's values, or accept the change with "
            f"checkpoint.allow_changed=[{names}]. Options that cannot change the weights may always change: "
            f"{', '.join(f + '*' if f.endswith('.') else f for f in FREE_ON_RESUME)}."
        )
    if changes:
        logger.warning("resuming from %s with changed settings (checkpoint.allow_changed): %s", path,
                       "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes))
    return changes


# What a run writes in train.output_dir (trainer.py, logs.py, checkpoint.py) and, per
# folder, the names it writes inside; a leading "." is an atomic writer's temporary sibling.
RUN_ENTRIES = {"log.jsonl": None, "final": None, "tensorboard": None,
               "targets": re.compile(r"shard_\d+\.safetensors|index\.json|\..+"),
               "checkpoints": re.compile(r"checkpoint_\d+|latest|\..+"), "samples": re.compile(r"step_\d+|\..+")}


def check_output_dir(path: Path) -> None:
    """Refuse a `train.output_dir` holding anything a run did not write (a user's file, a
    log.jsonl that is not a run log, a final/ that is not a saved pipeline or adapter)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"config option train.output_dir: {path} exists and is not a folder")
    foreign = []
    for entry in sorted(path.iterdir()):
        inside = RUN_ENTRIES.get(entry.name, False)
        if entry.name.startswith("."):
            continue  # an atomic writer's temporary sibling (the trainer removes its own)
        if inside is False or (entry.name == "log.jsonl" and not _run_log(entry)):
            foreign.append(entry.name)
        elif entry.name == "final" and not any((entry / n).is_file() for n in ("model_index.json",
                                                                                "adapter_config.json")):
            foreign.append("final (not a saved pipeline or adapter)")
        elif inside is not None and entry.is_dir():
            foreign += [f"{entry.name}/{p.name}" for p in entry.iterdir() if not inside.fullmatch(p.name)]
    if foreign:
        raise ValueError(f"config option train.output_dir: {path} holds {', '.join(foreign[:5])}, which medim "
                         "train did not write; nothing there is changed: use an empty or new folder")


def _run_log(path: Path) -> bool:
    """Whether `path` is a run log: empty, or its first line a JSON object with a "step"."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        row = json.loads(first) if first.strip() else {"step": None}
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and "step" in row

"""`medim train --config cfg.yaml [section.key=value ...]`: train or fine-tune MeDiM.

Runs in one process, or one process per GPU under torchrun (`python -m medim.training` is the same
command). Every option lives in the YAML config (see configs/medim_paper.yaml and docs/training.md);
overrides use dotted keys, e.g. `optim.lr=1e-4 train.max_steps=500`.

`train.output_dir` is written into only when it is new, empty or a run of `medim train`: a resume
trims log.jsonl and replaces final/, so a folder holding anything else is refused before anything
loads (`check_output_dir`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HELP = "train MeDiM on a token cache (one process, or torchrun for DDP / FSDP)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (omit to start from the defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="config overrides, e.g. model.init=runs/base data.cache=cache/train optim.lr=1e-4",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    import yaml

    from medim.training import TrainingDiverged, distill, load_config, train
    from medim.training.checkpoint import CheckpointError
    from medim.training.resume import ResumeRefused

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    check_output_dir(Path(config.train.output_dir))
    try:
        out = distill(config) if config.distill.teacher else train(config)  # torchrun -m medim.training distills too
    except (TrainingDiverged, ResumeRefused, CheckpointError) as e:  # expected stops: the message, no traceback
        raise SystemExit(f"medim train: {e}") from None
    if out.final_dir is not None:  # the main process: say where the result is and how the run ended
        print(f"medim train: finished at step {out.step}; trained pipeline in {out.final_dir}{_last_losses(out)}")
    return 0


def _last_losses(out) -> str:
    """The last logged training losses and validation loss, as " (loss 0.41, ...)", or ""."""
    last = next((r for r in reversed(out.history) if "loss" in r), {})
    val = next((r for r in reversed(out.history) if "val_loss" in r), {})
    values = {k: last[k] for k in ("loss", "loss_text", "loss_image") if k in last}
    if "val_loss" in val:
        values["val_loss"] = val["val_loss"]
    return f" (last logged: {', '.join(f'{k} {v:.4g}' for k, v in values.items())})" if values else ""


# What a run writes in train.output_dir (medim/training: trainer.py, logs.py, checkpoint.py) and, per
# folder, the names it writes inside; a leading "." is an atomic writer's temporary sibling.
RUN_ENTRIES = {"log.jsonl": None, "final": None, "tensorboard": None,
               "checkpoints": re.compile(r"checkpoint_\d+|latest|\..+"), "samples": re.compile(r"step_\d+|\..+")}


def check_output_dir(path: Path) -> None:
    """Refuse a `train.output_dir` holding anything `medim train` did not write (a user's file, a
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

"""`medim train --config cfg.yaml [section.key=value ...]`: train or fine-tune MeDiM.

Runs in one process, or one process per GPU under torchrun (`python -m medim.training` is the same
command). Every option lives in the YAML config (see configs/medim_paper.yaml and docs/training.md);
overrides use dotted keys, e.g. `optim.lr=1e-4 train.max_steps=500`.
"""

from __future__ import annotations

import argparse
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

    from medim.commands.common import finish_training_run
    from medim.training import TrainingDiverged, distill, load_config, train
    from medim.training.checkpoint import CheckpointError
    from medim.training.resume import ResumeRefused, check_output_dir

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    check_output_dir(Path(config.train.output_dir))  # the Trainer checks too; here no run is set up
    try:
        out = distill(config) if config.distill.teacher else train(config)  # torchrun -m medim.training distills too
    except (TrainingDiverged, ResumeRefused, CheckpointError) as e:  # expected stops: the message, no traceback
        raise SystemExit(f"medim train: {e}") from None
    what = (f"LoRA adapter in {out.final_dir} (use it with --lora {out.final_dir})" if config.lora.r
            else f"trained pipeline in {out.final_dir}")
    return finish_training_run("medim train", config, out, what + _last_losses(out))


def _last_losses(out) -> str:
    """The last logged training losses and validation loss, as " (loss 0.41, ...)", or ""."""
    last = next((r for r in reversed(out.history) if "loss" in r), {})
    val = next((r for r in reversed(out.history) if "val_loss" in r), {})
    values = {k: last[k] for k in ("loss", "loss_text", "loss_image") if k in last}
    if "val_loss" in val:
        values["val_loss"] = val["val_loss"]
    return f" (last logged: {', '.join(f'{k} {v:.4g}' for k, v in values.items())})" if values else ""



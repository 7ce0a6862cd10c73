"""Where a run's metrics go: `log.jsonl` (trimmed to the resumed step, torn lines dropped), the console,
and TensorBoard / W&B when configured."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medim.training.config import TrainConfig
from medim.utils.hub import atomic_file

logger = logging.getLogger(__name__)

__all__ = ["RunLog", "training_summary"]


class RunLog:
    """The main rank's metric sinks. Opening it on a resumed run keeps the lines up to `step` (the
    run redoes the later ones); a line that is not JSON (a write cut short by a kill) is dropped
    with a warning."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, step: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "log.jsonl"
        self.history: list[dict] = []
        self._writers: list = []
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"{self.path} is not a file: the run's log cannot be written there")
        if self.path.is_file():
            kept = []
            for number, line in enumerate(self.path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    logger.warning("%s line %d is not JSON (a write cut short?): dropped", self.path, number)
                    continue
                at = record.get("step", 0) if isinstance(record, dict) else None
                if isinstance(at, int) and at <= step:
                    kept.append(line)
            with atomic_file(self.path) as f:
                f.write("".join(line + "\n" for line in kept))
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard=true needs tensorboard: pip install 'medim-diffusion[train]'") from e
            self._writers.append(("tb", SummaryWriter(str(out_dir / "tensorboard"))))
        if cfg.log.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("log.wandb_project needs `pip install wandb`") from e
            self._writers.append(("wandb", wandb.init(project=cfg.log.wandb_project, config=cfg.to_dict())))

    def write(self, record: dict) -> None:
        """Append one record (it has a "step") everywhere."""
        self.history.append(record)
        logger.info("step %d: %s", record["step"], " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for kind, writer in self._writers:
            if kind == "tb":
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, record["step"])
            else:
                writer.log(record, step=record["step"])

    def close(self) -> None:
        for kind, writer in self._writers:
            writer.close() if kind == "tb" else writer.finish()
        self._writers = []


def training_summary(history: list[dict], step: int, cfg: TrainConfig, num_train: int) -> dict:
    """What a run knows about itself, for the trained pipeline's model card: steps, samples, the
    data cache, the last logged losses and the last validation loss."""
    last = next((r for r in reversed(history) if "loss" in r), {})
    val = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
    summary = {"steps": step, "samples_seen": step * cfg.train.global_batch_size,
               "data_cache": Path(cfg.data.cache).name, "data_size": num_train, "val_size": cfg.data.val_size,
               **{k: last[k] for k in ("loss", "loss_text", "loss_image") if k in last}}
    return summary if val is None else {**summary, "val_loss": val}


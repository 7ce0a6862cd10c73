"""The non-finite step guard: device counters of applied and skipped steps, read at log boundaries,
and the check that keeps non-finite weights out of checkpoints and final/."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from medim.training.distributed import all_mean

__all__ = ["StepGuard", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """`train.max_bad_steps` non-finite steps in a row, or a run that ended on non-finite steps."""


class StepGuard:
    """Long counters on the device, updated every step without a host sync: applied updates (the LR
    index), skipped steps, the current run of non-finite steps, the step it began at, and the step
    at which it reached `max_bad_steps` (0: not reached). Read them with the metrics at a boundary.
    """

    NAMES = ("updates", "skipped", "streak", "streak_start", "limit_step")

    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad_steps = max_bad_steps
        self.counters = {name: torch.zeros((), dtype=torch.long, device=device) for name in self.NAMES}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.counters[name]

    def record(self, bad: torch.Tensor, step: int) -> None:
        """Count step `step` (1-based), non-finite where the bool tensor `bad` is set."""
        c, bad = self.counters, bad.long()
        c["updates"] += 1 - bad
        c["skipped"] += bad
        c["streak"] = (c["streak"] + 1) * bad
        c["streak_start"] = torch.where(c["streak"] == 1, step, c["streak_start"])
        reached = (c["limit_step"] == 0) & (c["streak"] >= self.max_bad_steps)
        c["limit_step"] = torch.where(reached, step, c["limit_step"])

    def values(self) -> torch.Tensor:
        """The counters as one float64 tensor, in NAMES order (for a batched host read)."""
        return torch.stack([self.counters[n] for n in self.NAMES]).double()

    def check(self, values: dict[str, float], last_checkpoint: Path | None) -> None:
        """Raise TrainingDiverged when the host-read `values` show max_bad_steps in a row."""
        limit = int(values["limit_step"])
        if not limit:
            return
        start = int(values["streak_start"])
        where = str(last_checkpoint) if last_checkpoint else "none was written"
        raise TrainingDiverged(
            f"training diverged at step {limit}: {self.max_bad_steps} non-finite steps in a row (steps "
            f"{start}-{limit}: loss or gradient norm NaN/inf; train.max_bad_steps={self.max_bad_steps}). "
            f"They were skipped, so the weights are those of step {start - 1}; the newest checkpoint: "
            f"{where}. Lower optim.lr (resume with checkpoint.allow_changed=[optim.lr]) or check the data."
        )

    def unsafe_to_save(self, tensors: list[torch.Tensor]) -> str | None:
        """Why weights must not be saved now (None when they may): a run of non-finite steps is going
        on, or one of `tensors` (weights, EMA averages; DTensor shards under FSDP) is not finite.
        One host read; every rank gets the same answer."""
        local = [t.detach().to_local() if isinstance(t, DTensor) else t.detach() for t in tensors]
        finite = torch.stack([t.isfinite().all() for t in local]).all().float()
        streak, finite = torch.stack([self.counters["streak"].float(), all_mean(finite)]).tolist()
        if streak:
            return f"the last {int(streak)} steps were non-finite"
        if finite < 1:
            return "some weights are not finite"
        return None

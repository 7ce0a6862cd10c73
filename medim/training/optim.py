"""AdamW, the learning-rate schedule and the weight EMA."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import get_scheduler

from medim.training.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "EMA"]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup then the named decay, exactly transformers' `get_scheduler` (what the release used).

    `cosine_with_restarts` decays to 0 `num_cycles` times over `max_steps`, restarting at the peak.
    """
    o = cfg.optim
    extra = {"num_cycles": o.num_cycles} if o.scheduler == "cosine_with_restarts" else None
    return get_scheduler(
        o.scheduler,
        optimizer,
        num_warmup_steps=o.warmup_steps,
        num_training_steps=cfg.train.max_steps,
        scheduler_specific_kwargs=extra,
    )


class EMA:
    """Float32 exponential moving average of the trainable weights: ema = d * ema + (1 - d) * w.

    Under FSDP the averages are sharded like the weights (DTensors), so no rank holds a full copy.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies (collective under FSDP: every rank must call it)."""
        return {
            name: (t.full_tensor() if isinstance(t, DTensor) else t).cpu() for name, t in self.shadow.items()
        }

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]} ({len(missing)} keys missing)")
        for name, t in self.shadow.items():
            full = state[name].to(torch.float32)
            if isinstance(t, DTensor):
                full = distribute_tensor(full.to(t.device), t.device_mesh, t.placements)
            t.copy_(full)

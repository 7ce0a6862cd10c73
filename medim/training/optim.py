"""AdamW (fused: one kernel, non-finite steps skipped on the device), the learning-rate schedule as a
device table, and the weight EMA."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from transformers import get_scheduler

from medim.training.config import TrainConfig

__all__ = ["build_optimizer", "apply_hyperparameters", "build_scheduler", "lr_table", "EMA"]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights with the config's settings; fused where torch has the kernel
    for the weights' device (CPU, CUDA, MPS, XPU, ...). The fused kernel can take its learning rate
    as a device tensor and skips a step whose `found_inf` is set (`apply_hyperparameters`), so the
    trainer schedules the LR and drops non-finite steps without reading anything back to the host."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    o = cfg.optim
    fused = params[0].device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=fused)


def apply_hyperparameters(optimizer: torch.optim.AdamW, cfg: TrainConfig, device: torch.device) -> None:
    """Set the config's betas, eps and weight decay on every group (also after loading a checkpoint,
    whose stored groups would otherwise win) and give fused groups a device LR tensor (its value is
    set every step from the schedule)."""
    o = cfg.optim
    for group in optimizer.param_groups:
        group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if group["fused"]:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
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


def lr_table(cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """float32 [max_steps + 1]: the learning rate of the n-th applied update, from `build_scheduler`.

    Indexed on the device by the count of applied updates, so a skipped step does not advance the
    schedule and nothing is read back to the host.
    """
    sched = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr), cfg)
    factor = sched.lr_lambdas[0]
    return torch.tensor([cfg.optim.lr * factor(n) for n in range(cfg.train.max_steps + 1)],
                        dtype=torch.float32, device=device)


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
    def update(self, model: torch.nn.Module, applied: torch.Tensor | None = None) -> None:
        """Move towards the weights; `applied` (a bool tensor on the weights' device) False leaves
        the averages as they are, without a host sync."""
        weight = 1.0 - self.decay if applied is None else applied.float() * (1.0 - self.decay)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), weight)

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

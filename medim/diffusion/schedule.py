"""Noise schedules of the absorbing (masking) diffusion.

A schedule maps the diffusion time t in [0, 1] to the total noise sigma(t); a token is masked at
time t with probability 1 - exp(-sigma(t)) (the "move chance"), so alpha(t) = exp(-sigma(t)) is the
probability that it is still clean. dsigma/dt enters the continuous-time (MDLM) loss weight
dsigma / expm1(sigma). The released MeDiM uses the log-linear schedule with eps = 1e-3, whose
move chance is exactly (1 - eps) * t and whose loss weight is exactly 1 / t.

Example:
    >>> import torch

from medim.utils.checks import check_choice
    >>> from medim.diffusion import get_schedule
    >>> s = get_schedule("loglinear")
    >>> s.move_chance(torch.tensor([0.5]))
    tensor([0.4995])
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass

import torch

from medim.utils.checks import check_choice, check_number

__all__ = ["NoiseSchedule", "LogLinearSchedule", "LinearSchedule", "CosineSchedule", "SCHEDULES", "get_schedule"]


def _check_eps(eps: float) -> None:
    # eps outside (0, 1) turns the move chance negative or above 1: every likelihood would be nonsense.
    if check_number(eps, "eps") <= 0 or eps >= 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")


class NoiseSchedule(abc.ABC):
    """Base class: subclasses define `sigma(t)` and `dsigma(t)` (elementwise on float tensors)."""

    @abc.abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma(t)."""

    @abc.abstractmethod
    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        """Its time derivative dsigma/dt."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t: exp(-sigma(t))."""
        return torch.exp(-self.sigma(t))

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - exp(-sigma(t))."""
        return -torch.expm1(-self.sigma(t))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The MDLM (SUBS) continuous-time weight dsigma / expm1(sigma)."""
        return self.dsigma(t) / torch.expm1(self.sigma(t))


@dataclass(frozen=True)
class LogLinearSchedule(NoiseSchedule):
    """sigma(t) = -log(1 - (1 - eps) t): the move chance grows linearly, (1 - eps) t (release default)."""

    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_eps(self.eps)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        # Closed form: exact, and avoids the round trip through log/exp.
        return (1 - self.eps) * t


@dataclass(frozen=True)
class LinearSchedule(NoiseSchedule):
    """sigma(t) = sigma_min + t (sigma_max - sigma_min): the total noise grows linearly."""

    sigma_min: float = 1e-4
    sigma_max: float = 20.0

    def __post_init__(self) -> None:
        check_number(self.sigma_min, "sigma_min", minimum=0)
        check_number(self.sigma_max, "sigma_max", minimum=0)
        if self.sigma_max < self.sigma_min:  # equal is a constant schedule (tests use one)
            raise ValueError(f"sigma_max must be at least sigma_min, got {self.sigma_max!r} < {self.sigma_min!r}")

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.sigma_max - self.sigma_min)


@dataclass(frozen=True)
class CosineSchedule(NoiseSchedule):
    """alpha(t) = eps + (1 - eps) cos(pi t / 2): the clean fraction falls like a quarter cosine."""

    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check_eps(self.eps)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * math.pi / 2))

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        half_pi = math.pi / 2
        return (1 - self.eps) * half_pi * torch.sin(t * half_pi) / (
            self.eps + (1 - self.eps) * torch.cos(t * half_pi)
        )


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "loglinear": LogLinearSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
}


def get_schedule(schedule: str | NoiseSchedule = "loglinear", **kwargs) -> NoiseSchedule:
    """Return a schedule instance from a registry name (`SCHEDULES`) or pass an instance through.

    Example:
        >>> get_schedule("cosine", eps=1e-4)
        CosineSchedule(eps=0.0001)
    """
    if isinstance(schedule, NoiseSchedule):
        if kwargs:
            raise ValueError(f"schedule: options {sorted(kwargs)} only apply when passing a name")
        return schedule
    check_choice(schedule, "schedule", sorted(SCHEDULES))
    accepted = [f.name for f in dataclasses.fields(SCHEDULES[schedule])]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"schedule {schedule!r} takes the options {accepted}, got unknown {unknown}")
    return SCHEDULES[schedule](**kwargs)

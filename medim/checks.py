"""Argument checks shared by every layer: dtype and device, checkpoint tensor names and shapes, and
how a bad value is described.

Each public entry point checks its inputs once, before any compute, with these helpers, so every
error names the argument and what is accepted in the same words.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["describe", "check_dtype_device", "check_state_shapes"]


def describe(value: Any) -> str:
    """A short description of a value for an error message: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def check_dtype_device(
    dtype: torch.dtype | None, device: str | torch.device | None
) -> tuple[torch.dtype | None, torch.device | None]:
    """Validate a `dtype` (a floating torch.dtype or None) and a `device` (anything torch.device
    accepts, or None); returns them with the device parsed. The meta device is refused: it holds
    no data, so a model put there could never run.

    Example:
        >>> check_dtype_device(torch.bfloat16, "cuda:0")
        (torch.bfloat16, device(type='cuda', index=0))
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if device is None:
        return dtype, None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a string like 'cpu' or 'cuda:0', got {device!r}") from e
    if parsed.type == "meta":
        raise ValueError("device 'meta' holds no data; load onto a real device such as 'cpu' or 'cuda'")
    return dtype, parsed


def check_state_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise ValueError listing the missing, unexpected and mis-shaped tensors of a checkpoint
    (`found`: name -> shape read from the file) against a model (`expected`). `what` names the file."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                   for k in expected.keys() & found.keys() if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        problems = [f"{label} ({len(keys)}): {_listing(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{what} does not match the model:\n  " + "\n  ".join(problems))


def _listing(items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

"""Argument checks shared by every layer: ints, numbers, choices and flags; dtype and device;
checkpoint tensor names and shapes; how a bad value is described.

Each public entry point checks its inputs once, before any compute, with these helpers, so every
error names the argument and what is accepted in the same words. Internal calls below that edge
take their inputs as valid and do not check again. torch is imported only where a check needs it:
torch-free modules (phantoms, sharding, argument parsing) use the scalar checks too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["describe", "check_int", "check_number", "check_choice", "check_bool", "check_dtype_device",
           "check_state_shapes"]


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """`value` if it is an int (not a bool) within [minimum, maximum] (or None when `allow_none`);
    else ValueError naming `name`.

    Example:
        >>> check_int(8, "batch_size", minimum=1)
        8
    """
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        kind = "None or an int" if allow_none else "an int"
        raise ValueError(f"{name} must be {kind}{_bounds(minimum, maximum)}, got {value!r}")
    return value


def check_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 allow_none: bool = False) -> float | None:
    """`value` if it is a finite int or float (not a bool) within [minimum, maximum] (or None when
    `allow_none`); else ValueError naming `name`.

    Example:
        >>> check_number(5.0, "guidance_scale", minimum=0)
        5.0
    """
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        kind = "None or a finite number" if allow_none else "a finite number"
        raise ValueError(f"{name} must be {kind}{_bounds(minimum, maximum)}, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: tuple | list) -> Any:
    """`value` if it is one of `choices`; else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """`value` if it is a bool (not 0/1 or a string); else TypeError naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def describe(value: Any) -> str:
    """A short description of a value for an error message: a tensor's dtype and shape, else its type."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def check_dtype_device(
    dtype: torch.dtype | None, device: str | torch.device | None
) -> tuple[torch.dtype | None, torch.device | None]:
    """Validate a `dtype` (a floating torch.dtype or None) and a `device` (anything torch.device
    accepts, or None); returns them with the device parsed. The meta device is refused: it holds
    no data, so a model put there could never run. So is an accelerator torch does not see
    ("cuda" on a CPU build or a machine without a GPU, "cuda:3" with two GPUs), before any loading.

    Example:
        >>> check_dtype_device(torch.bfloat16, "cpu")
        (torch.bfloat16, device(type='cpu'))
    """
    import torch

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
    backend = getattr(torch, parsed.type, None) if parsed.type != "cpu" else None  # torch.cuda, torch.mps, ...
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(f"device {str(parsed)!r}: torch sees no {parsed.type} device here "
                         f"(torch.{parsed.type}.is_available() is False); use 'cpu'")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise ValueError(f"device {str(parsed)!r}: only {count()} {parsed.type} device(s) are visible")
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

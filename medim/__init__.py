"""medim: the reference implementation of MeDiM (discrete diffusion with an MLLM backbone for
unified medical image and report generation)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

# Public names, imported lazily so `import medim` stays cheap: name -> module that defines it.
_EXPORTS: dict[str, str] = {}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medim' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["__version__", *_EXPORTS]

"""medim: the reference implementation of MeDiM (discrete diffusion with an MLLM backbone for
unified medical image and report generation)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
# The name on the Python package index (`pip install medim-diffusion`); `medim` there is another project.
DISTRIBUTION = "medim-diffusion"

# Public names, imported lazily so `import medim` stays cheap: name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "sample": "medim.diffusion",
    "SampleOutput": "medim.diffusion",
    "diffusion_loss": "medim.diffusion",
    "LossOutput": "medim.diffusion",
    "get_schedule": "medim.diffusion",
    "SamplerConfig": "medim.diffusion",
    "report_metrics": "medim.evaluation",
    "ReportMetrics": "medim.evaluation",
    "fid": "medim.evaluation",
    "FIDResult": "medim.evaluation",
    "inception_score": "medim.evaluation",
    "pair_match": "medim.evaluation",
    "VQGAN": "medim.models.vqgan",
    "VQGANConfig": "medim.models.vqgan",
    "MeDiMPipeline": "medim.pipelines",
    "MeDiMOutput": "medim.pipelines",
    "Trainer": "medim.training",
    "TrainConfig": "medim.training",
    "load_config": "medim.training",
    "TokenCacheDataset": "medim.data.cache",
    "build_token_cache": "medim.data.cache",
    "MeDiMConfig": "medim.models.medim",
    "MeDiMModel": "medim.models.medim",
    "SequenceLayout": "medim.layout",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medim' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["__version__", "DISTRIBUTION", *_EXPORTS]

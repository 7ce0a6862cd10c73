"""LoRA fine-tuning in the trainer (`lora.r > 0`): adapters put on the model before it is compiled
or wrapped for DDP/FSDP, and `final/` written as a PEFT adapter folder.

Only the adapters and `lora.modules_to_save` train, so AdamW state, gradients, checkpoints and the
EMA hold only them; the frozen base is read from `model.init` again on resume. What adapters cost
and save is measured in benchmarks/bench_lora.py (docs/training.md, "LoRA fine-tuning").
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from medim.pipelines import lora as adapters
from medim.training.config import LoraSection

logger = logging.getLogger(__name__)

__all__ = ["apply_lora", "export_adapter", "peft_config"]


def peft_config(section: LoraSection):
    """The peft LoraConfig of the config's `lora` section."""
    return adapters.lora_config(r=section.r, alpha=section.alpha, dropout=section.dropout,
                                target_modules=section.target_modules, modules_to_save=section.modules_to_save)


def apply_lora(model: torch.nn.Module, section: LoraSection) -> int:
    """Put adapters on `model` in place and freeze the rest; returns the count of trainable weights.
    Names in `lora.target_modules` / `lora.modules_to_save` that match no module are refused."""
    adapters.add_adapter(model, peft_config(section))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d: %d of %d weights train (%.2f%%)", section.r, trainable, total, 100 * trainable / total)
    return trainable


def export_adapter(directory: Path, model: torch.nn.Module, section: LoraSection, *,
                   state: dict[str, torch.Tensor], base_model: str, training: dict) -> Path:
    """Write `state` (the trainable weights by parameter name: gathered, or the EMA's) as a PEFT
    adapter folder with a model card whose `base_model` is `model.init`."""
    return adapters.save_adapter(directory, model, peft_config(section), overwrite=True, training=training,
                                 state=adapters.adapter_state_dict(model, state_dict=state), base_model=base_model)

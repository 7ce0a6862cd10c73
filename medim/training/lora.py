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


def peft_config(section: LoraSection, tokenizer):
    """The peft LoraConfig of the config's `lora` section; `lora.trainable_tokens` become token ids
    with `tokenizer` (the one of `model.init`)."""
    return adapters.lora_config(r=section.r, alpha=section.alpha, dropout=section.dropout,
                                target_modules=section.target_modules, modules_to_save=section.modules_to_save,
                                trainable_tokens=adapters.token_ids(tokenizer, section.trainable_tokens))


def apply_lora(model: torch.nn.Module, config) -> int:
    """Put adapters (`config`: `peft_config(...)`) on `model` in place and freeze the rest; returns the
    count of trainable weights. Names that match no module and token ids outside the vocabulary are
    refused."""
    adapters.add_adapter(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = len(config.trainable_token_indices or [])
    logger.info("LoRA r=%d, %d token rows: %d of %d weights train (%.2f%%)", config.r, rows, trainable, total,
                100 * trainable / total)
    return trainable


def export_adapter(directory: Path, model: torch.nn.Module, config, *,
                   state: dict[str, torch.Tensor], base_model: str, training: dict) -> Path:
    """Write `state` (the trainable weights by parameter name: gathered, or the EMA's) as a PEFT
    adapter folder with a model card whose `base_model` is `model.init`."""
    return adapters.save_adapter(directory, model, config, overwrite=True, training=training,
                                 state=adapters.adapter_state_dict(model, state_dict=state), base_model=base_model)

"""Tiny Chameleon-style VQGANs and the upstream taming checkpoint format (docs/formats.md, section 2).

- `tiny_model(seed, **overrides)`: a small random `VQGAN` (32 px -> 16x16 codes out of 64 by default).
- `write_taming(model, folder)`: `vqgan.ckpt` (`{"state_dict": ...}` with loss entries, as in the
  release) + `vqgan.yaml` (taming's VQModel config layout) in `folder`.
- `write_medim_folder(model, folder)`: a saved medim VQGAN folder written by hand, in the format
  `VQGAN.save_pretrained` has always written (config.json + model.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from medim.models.vqgan import VQGAN, VQGANConfig

TINY = dict(ch=32, ch_mult=(1, 2), resolution=32, n_embed=64, embed_dim=8, z_channels=8, num_res_blocks=1)


def tiny_model(seed: int = 0, **overrides) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(**{**TINY, **overrides})).eval()


def taming_yaml(config: VQGANConfig) -> dict:
    """The layout of the upstream vqgan.yaml (taming-transformers)."""
    dd = config.to_dict()
    params = {"embed_dim": dd.pop("embed_dim"), "n_embed": dd.pop("n_embed"), "ddconfig": dd,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                             "params": {"disc_start": 0, "codebook_weight": 1.0}}}
    return {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel", "params": params}}


def write_taming(model: VQGAN, folder: Path, state: dict | None = None) -> Path:
    """Write vqgan.ckpt + vqgan.yaml like the release: {"state_dict": ...} with loss entries."""
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = dict(model.state_dict())
        state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
        state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
        state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state}, folder / "vqgan.ckpt")
    (folder / "vqgan.yaml").write_text(yaml.safe_dump(taming_yaml(model.config)))
    return folder / "vqgan.ckpt"


def write_medim_folder(model: VQGAN, folder: Path, version: str = "0.1.0.dev0") -> Path:
    """config.json ("_class_name"/"_medim_version" then the VQGANConfig fields, indent 2, final
    newline) + model.safetensors (the state dict, header metadata {"format": "pt"})."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "VQGAN", "_medim_version": version, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder

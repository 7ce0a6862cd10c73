"""Building MeDiM models from upstream checkpoints: Liquid's first layers, and the released weights.

- `load_liquid`: the first `num_layers` layers of Liquid_V1_7B (or any Gemma/Llama-style causal LM in
  the transformers format), reading only the tensors kept, from only the shards holding them,
  straight into the target dtype; plus a mask row, a fresh timestep embedder and identity AdaLN.
- `load_original`: the released MeDiM accelerate checkpoint (medim-v1 layout), strictly checked.

Users call them as `MeDiMModel.from_liquid` / `MeDiMModel.from_original`, which pass their own
class in (so this module never imports the model's). Models are built on the meta device and the
tensors are assigned in, so nothing is materialised twice and no layer that is dropped is ever read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from transformers import PretrainedConfig

from medim.layout import MeDiMV1Layout, NativeLayout, SequenceLayout
from medim.models.backbone import (
    backbone_config_from_dict,
    fix_liquid_activation,
    liquid_backbone_config,
    native_layout_for,
)
from medim.utils.checks import check_dtype_device, check_int, check_state_shapes
from medim.utils.hub import HubOptions, resolve_file, resolve_snapshot

__all__ = ["load_liquid", "load_original"]

logger = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """Assign `state` into a meta-device model (strict), then materialise the non-persistent
    buffers (rotary frequencies, embedding scale) on `device`."""
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    for p in model.parameters():
        p._is_hf_initialized = True  # the guarded transformers init functions leave these alone
    # Rotary frequencies are computed from the config, never stored; transformers < 5 has no
    # `_init_weights` rule for them, so rebuild the module (a few floats) on the target device.
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(model.config.backbone_config)
    for module in model.modules():
        meta = [name for name, buf in module.named_buffers(recurse=False) if buf is not None and buf.is_meta]
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        if meta:
            model._init_weights(module)
    return model.eval()


def _new_parameters(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh timestep embedder (DiT-style normal init) and identity AdaLN for every layer."""
    std = model.config.initializer_range
    state = {}
    for name, p in model.time_embedder.named_parameters():
        value = torch.zeros(p.shape, dtype=dtype, device=device)
        state[f"time_embedder.{name}"] = value.normal_(0.0, std) if name.endswith("weight") else value
    for i, layer in enumerate(model.layers):
        ada = type(layer.adaLN_modulation)(layer.adaLN_modulation.in_features).to(device=device, dtype=dtype)
        ada.reset_to_identity()
        state[f"layers.{i}.adaLN_modulation.weight"] = ada.weight.data
        state[f"layers.{i}.adaLN_modulation.bias"] = ada.bias.data
    return state


def load_liquid(
    model_class: type,
    repo_or_dir: str | os.PathLike,
    *,
    num_layers: int = 10,
    layout: str | dict | SequenceLayout = "native",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    image_offset: int | None = 256000,
    image_vocab_size: int = 8192,
    text_len: int = 256,
    image_len: int = 1024,
    hub: HubOptions | None = None,
) -> Any:
    """Build a fresh `model_class` (MeDiMModel) from the first `num_layers` layers of a
    Liquid-format checkpoint.

    Only `config.json`, the shard index and the shards that hold embed / norm / kept layers are
    opened (or downloaded). The mask row is the mean of the text embeddings: a point inside the
    cloud of real tokens, so the pretrained layers see an ordinary-looking input (a zero row would
    be blown up by RMSNorm). Appended image rows (plain LLMs) are that mean plus noise of the
    table's spread. AdaLN starts as the identity, so every block equals the pretrained block.

    Example:
        >>> model = MeDiMModel.from_liquid("Junfeng5/Liquid_V1_7B", num_layers=10, dtype=torch.bfloat16)
    """
    check_int(num_layers, "num_layers", minimum=1)
    if isinstance(layout, str) and layout != "native":
        raise ValueError(f"layout must be 'native' (or a native layout dict) for Liquid, got {layout!r}; "
                         "the medim-v1 layout belongs to the released weights (MeDiMModel.from_original)")
    dtype, device = check_dtype_device(dtype, device)
    dtype, device, hub = dtype or torch.float32, device or torch.device("cpu"), hub or HubOptions()
    backbone, source_vocab = _liquid_config(repo_or_dir, hub, num_layers)
    tied = getattr(backbone, "tie_word_embeddings", True)
    if isinstance(layout, str):
        layout = native_layout_for(backbone, image_offset, image_vocab_size, text_len, image_len)
    layout = SequenceLayout.from_dict(layout)
    if not isinstance(layout, NativeLayout):
        raise ValueError(f"load_liquid builds the native layout, got {layout.name!r}")
    backbone.num_hidden_layers = num_layers
    backbone.vocab_size = max(layout.min_vocab_size, source_vocab)
    by_file = _kept_tensors(repo_or_dir, hub, num_layers, tied)

    with torch.device("meta"):
        model = model_class(model_class.config_class(backbone, layout=layout.to_dict(), tie_word_embeddings=tied))
    state = _new_parameters(model, dtype, device)
    for filename, names in by_file.items():
        path = resolve_file(repo_or_dir, filename, hub=hub)
        logger.info("reading %d tensors from %s", len(names), path.name)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in names:
                state[k.removeprefix("model.")] = f.get_tensor(k).to(device=device, dtype=dtype)
    extra = backbone.vocab_size - source_vocab
    if extra:
        state["embed_tokens.weight"] = _append_rows(state["embed_tokens.weight"], layout, extra)
        if not tied:
            state["lm_head.weight"] = _append_rows(state["lm_head.weight"], layout, extra)
    return _assign(model, state, device)


def _liquid_config(repo_or_dir: str | os.PathLike, hub: HubOptions, num_layers: int) -> tuple[PretrainedConfig, int]:
    """The checkpoint's backbone config (Liquid's activation fixed), checked to hold `num_layers`,
    and its vocabulary size."""
    cfg = fix_liquid_activation(json.loads(resolve_file(repo_or_dir, "config.json", hub=hub).read_text()))
    if "model_type" not in cfg:
        raise ValueError(f"{repo_or_dir}: config.json has no model_type")
    backbone = backbone_config_from_dict(cfg)
    if num_layers > backbone.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers} but the checkpoint has only {backbone.num_hidden_layers} layers")
    return backbone, cfg["vocab_size"]


def _kept_tensors(repo_or_dir: str | os.PathLike, hub: HubOptions, num_layers: int, tied: bool) -> dict[str, list[str]]:
    """file -> the names of the tensors kept (embeddings, final norm, the first `num_layers`
    layers, the head unless tied) it holds; raises when the checkpoint lacks any."""
    wanted = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied:
        wanted.add("lm_head.weight")
    files = _checkpoint_files(repo_or_dir, hub)
    keys = set(files)
    wanted |= {k for k in keys if (m := _LAYER_KEY.match(k)) and int(m.group(1)) < num_layers}
    missing = sorted(wanted - keys)
    if missing:
        raise ValueError(f"{repo_or_dir}: checkpoint lacks {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    by_file: dict[str, list[str]] = defaultdict(list)
    for k in sorted(wanted):
        by_file[files[k]].append(k)
    return by_file


def _append_rows(table: torch.Tensor, layout: NativeLayout, extra: int) -> torch.Tensor:
    text = table[: layout.text_vocab_size].float()
    mean, spread = text.mean(0), text.std(0)
    rows = mean.expand(extra, -1).clone()
    rows[:-1] += torch.randn(extra - 1, table.shape[1], device=table.device) * spread  # appended image rows
    return torch.cat([table, rows.to(table.dtype)])


def _checkpoint_files(repo_or_dir: str | os.PathLike, hub: HubOptions) -> dict[str, str]:
    """tensor name -> file holding it, from the shard index (or the single model.safetensors)."""
    try:
        index = resolve_file(repo_or_dir, "model.safetensors.index.json", hub=hub)
    except (FileNotFoundError, OSError):
        index = None
    if index is not None:
        return json.loads(index.read_text())["weight_map"]
    path = resolve_file(repo_or_dir, "model.safetensors", hub=hub)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _release_file(repo_or_dir: str | os.PathLike, hub: HubOptions) -> Path:
    """`model.safetensors` at the top, else under the highest `checkpoint_<step>/` holding one."""
    def pick(names: list[str]) -> str | None:
        if "model.safetensors" in names:
            return "model.safetensors"
        steps = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"checkpoint_(\d+)/model\.safetensors", n))]
        return max(steps)[1] if steps else None

    path = Path(repo_or_dir).expanduser()
    if path.is_dir():
        names = [p.relative_to(path).as_posix() for p in path.glob("checkpoint_*/model.safetensors")]
        names += ["model.safetensors"] if (path / "model.safetensors").is_file() else []
    elif hub.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        snap = resolve_snapshot(repo_or_dir, ["model.safetensors", "checkpoint_*/model.safetensors"], hub=hub)
        return _release_file(snap, hub)
    else:
        names = HfApi().list_repo_files(str(repo_or_dir), revision=hub.revision, token=hub.token)
    chosen = pick(names)
    if chosen is None:
        raise FileNotFoundError(
            f"{repo_or_dir}: no model.safetensors at the top or under checkpoint_<step>/ (found {sorted(names)[:10]})"
        )
    return resolve_file(repo_or_dir, chosen, hub=hub)


def load_original(
    model_class: type,
    repo_or_dir: str | os.PathLike = "JiaMao/medim_ckpts",
    *,
    backbone_config: PretrainedConfig | None = None,
    layout: dict | SequenceLayout | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    hub: HubOptions | None = None,
) -> Any:
    """Load the released MeDiM weights (accelerate `save_state` output) into a `model_class`
    (MeDiMModel) with the medim-v1 layout.

    `backbone_config` defaults to Liquid's Gemma config with 10 layers and 40196 rows; `layout` to
    medim-v1 for that vocabulary. Every key is checked: missing, unexpected and mis-shaped keys are
    listed in the error.

    Example:
        >>> model = MeDiMModel.from_original("JiaMao/medim_ckpts", dtype=torch.bfloat16, device="cuda")
    """
    dtype, device = check_dtype_device(dtype, device)
    dtype, device = dtype or torch.float32, device or torch.device("cpu")
    layout = SequenceLayout.from_dict(layout if layout is not None else MeDiMV1Layout().to_dict())
    if not isinstance(layout, MeDiMV1Layout):
        raise ValueError(f"the released checkpoint uses the medim-v1 layout, got {layout.name!r}")
    if backbone_config is None:
        backbone_config = liquid_backbone_config(10, layout.min_vocab_size)
    backbone_config = backbone_config.__class__.from_dict(backbone_config.to_dict())  # never mutate the caller's
    backbone_config.tie_word_embeddings = True
    path = _release_file(repo_or_dir, hub or HubOptions())
    with torch.device("meta"):
        config = model_class.config_class(backbone_config, layout=layout.to_dict(), tie_word_embeddings=True)
        model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        found = {k.removeprefix("model."): k for k in f.keys() if k != "lm_head.weight"}
        check_state_shapes(expected, {k: tuple(f.get_slice(name).get_shape()) for k, name in found.items()},
                           f"{path} ({backbone_config.num_hidden_layers} layers, hidden "
                           f"{backbone_config.hidden_size}, vocab {backbone_config.vocab_size})")
        state = {k: f.get_tensor(name).to(device=device, dtype=dtype) for k, name in found.items()}
    return _assign(model, state, device)

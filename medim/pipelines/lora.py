"""LoRA adapters on a MeDiM model through peft: inject, read and write PEFT adapter folders, check
that an adapter fits its base, fuse, unfuse and unload.

An adapter folder holds `adapter_config.json` (peft's LoraConfig) and `adapter_model.safetensors`
(keys as `PeftModel.save_pretrained` writes them, `base_model.model.<module>.lora_A.weight`), plus
a README.md model card. The safetensors metadata also records the base it was trained on (layout
and backbone shape), so an adapter for another base is refused before anything changes. Only those
two files are ever read: no pickle, no code from the folder.

peft wraps the targeted modules in place, so the model keeps its class, its forward and the
sampler's calls. `AdaLNModulation` returns its six chunks rather than a tensor; its LoRA layer adds
the low-rank update to the plain linear map and chunks after.

Trainable token rows (peft's `trainable_token_indices`, `lora.trainable_tokens` in training) retrain
chosen rows of the token embedding, the tied output head with them: words a base tokenizer splits
into pieces its model rarely saw (a new finding's name) need their rows, which low-rank updates
of the layers cannot give.

Example:
    >>> pipe = MeDiMPipeline.from_pretrained("org/medim-cxr")
    >>> pipe.load_lora_weights("runs/lora/final")        # or a Hub repo id
    >>> pipe.fuse_lora()                                  # optional: no adapter cost per step
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medim.models.medim import AdaLNModulation
from medim.utils.checks import check_int, check_number, check_state_shapes
from medim.utils.hub import HubOptions, atomic_directory, check_replaceable, refuse_outside_links, resolve_file

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoadedAdapter", "lora_config", "token_ids", "check_targets",
           "add_adapter",
           "adapter_state_dict", "save_adapter", "read_adapter", "check_fit", "load_adapter", "fuse", "unfuse",
           "unload", "base_signature"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The key prefix of PeftModel.save_pretrained (PeftModel -> LoraModel -> the model).
PEFT_PREFIX = "base_model.model."
# adapter_config.json keys that only describe the adapter; every other key must keep peft's default.
DESCRIPTIVE_KEYS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                    "inference_mode"}
USED_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora",
             "trainable_token_indices"}
BACKBONE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size")
CARD_TAGS = ("medim", "lora", "peft", "medical-imaging", "discrete-diffusion")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA adapters need peft: pip install 'medim-diffusion[train]' (or pip install peft)") from e
    return peft


@functools.cache
def _adaln_lora_class() -> type:
    """peft's lora.Linear for AdaLNModulation, whose forward returns (shift, scale, gate) x 2."""
    from peft.tuners.lora import Linear

    class AdaLNLoraLinear(Linear):
        def forward(self, temb: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
            base = self.get_base_layer()
            out = nn.functional.linear(temb, base.weight, base.bias)
            if not (self.disable_adapters or self.merged):
                for name in self.active_adapters:
                    if name in self.lora_A:
                        a, b = self.lora_A[name], self.lora_B[name]
                        x = self._cast_input_dtype(temb, a.weight.dtype)
                        out = out + (b(a(self.lora_dropout[name](x))) * self.scaling[name]).to(out.dtype)
            return out[:, None].chunk(6, dim=-1)

    return AdaLNLoraLinear


def lora_config(*, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | tuple[str, ...],
                modules_to_save: list[str] | tuple[str, ...] = (), use_rslora: bool = False,
                trainable_tokens: list[int] | tuple[int, ...] = ()):
    """A peft `LoraConfig` for MeDiM (AdaLN modulation layers included as LoRA targets).
    `trainable_tokens`: embedding rows (token ids) trained in full, the tied head's with them.

    Example:
        >>> cfg = lora_config(r=16, alpha=16, target_modules=["q_proj", "v_proj", "adaLN_modulation"])
    """
    config = _peft().LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                                modules_to_save=list(modules_to_save) or None, use_rslora=use_rslora, bias="none",
                                trainable_token_indices=sorted(set(trainable_tokens)) or None)
    config._register_custom_module({AdaLNModulation: _adaln_lora_class()})
    return config


def token_ids(tokenizer, pieces: list[str] | tuple[str, ...]) -> list[int]:
    """The token ids of `pieces` of text as reports hold them: each piece alone and after a space
    (byte-level BPE tokenizers mark a word's leading space), special-token strings read as text.

    Example:
        >>> token_ids(pipe.tokenizer, ["pleural effusion", ","])      # doctest: +SKIP
    """
    ids: set[int] = set()
    for piece in pieces:
        for text in (piece, " " + piece):
            ids.update(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return sorted(ids)


def _token_rows(config) -> list[int]:
    return list(getattr(config, "trainable_token_indices", None) or [])


def _embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(k for k, m in model.named_modules() if m is embedding)


def _matches(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


def _modules(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    return [(k, m) for k, m in model.named_modules() if k and _matches(k, name)]


def check_targets(model: nn.Module, target_modules, modules_to_save, what: str = "lora") -> None:
    """Refuse target or full-training names that match no module of `model`, targets that are not
    linear layers, and a name in both lists; each error names the option and the names."""
    leaves = sorted({k.rpartition(".")[2] for k, m in model.named_modules() if isinstance(m, nn.Linear)})
    for option, names in (("target_modules", target_modules), ("modules_to_save", modules_to_save)):
        unmatched = [n for n in names if not _modules(model, n)]
        if unmatched:
            raise ValueError(f"{what}.{option}: {unmatched} match no module of the model; linear layers are "
                             f"named {leaves}")
    not_linear = sorted({n for n in target_modules for _, m in _modules(model, n) if not isinstance(m, nn.Linear)})
    if not_linear:
        raise ValueError(f"{what}.target_modules: {not_linear} are not linear layers (LoRA targets are, e.g. "
                         f"{leaves}); train whole modules with {what}.modules_to_save")
    both = sorted(set(target_modules) & set(modules_to_save))
    if both:
        raise ValueError(f"{what}: {both} are in both target_modules and modules_to_save; a module gets an "
                         "adapter or is trained in full, not both")


def add_adapter(model: nn.Module, config, adapter_name: str = "default") -> None:
    """Wrap `config.target_modules` (and `modules_to_save`) of `model` in place; only the adapter and
    the modules to save stay trainable. The model keeps its train/eval mode."""
    check_targets(model, sorted(config.target_modules), list(config.modules_to_save or []))
    _check_token_rows(model, _token_rows(config), "lora.trainable_tokens")
    training = model.training
    _peft().inject_adapter_in_model(config, model, adapter_name=adapter_name)
    model.train(training)  # the new modules start in training mode (dropout)


def _check_token_rows(model: nn.Module, rows: list[int], what: str) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [i for i in rows if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{what}: token ids {bad[:5]} are outside the model's vocabulary of {vocab} rows")


def adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file names (`state_dict`: the model's, e.g. gathered from
    FSDP shards or an EMA; default: the model's own)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def base_signature(model: nn.Module) -> dict[str, Any]:
    """What an adapter needs its base to be: the layout and the backbone's shape."""
    backbone = model.config.backbone_config
    return {"layout": model.layout.to_dict(), "backbone": {f: getattr(backbone, f, None) for f in BACKBONE_FIELDS}}


def _config_dict(config, base_model: str | None) -> dict[str, Any]:
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    data.update(base_model_name_or_path=base_model, inference_mode=True)
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def _card(config, *, base_model: str | None, repo_id: str, num_params: int, training: dict | None) -> ModelCard:
    data = ModelCardData(library_name="medim", base_model=base_model, tags=list(CARD_TAGS), license="other")
    targets = ", ".join(f"`{t}`" for t in sorted(config.target_modules))
    saved = ", ".join(f"`{m}`" for m in config.modules_to_save or []) or "none"
    rows = _token_rows(config)
    lines = [f"# {repo_id.rstrip('/').rpartition('/')[2] or repo_id}",
             f"A LoRA adapter for the MeDiM pipeline `{base_model or 'unknown'}` (library `medim`).",
             "## Usage",
             "```python\nfrom medim import MeDiMPipeline\n\n"
             f"pipe = MeDiMPipeline.from_pretrained({json.dumps(base_model or 'BASE')})\n"
             f"pipe.load_lora_weights({json.dumps(repo_id)})\n"
             'out = pipe.text_to_image(["A large dense nodule in the right upper zone."])\n```',
             "## Adapter",
             f"rank {config.r}, alpha {config.lora_alpha}, dropout {config.lora_dropout}; targets {targets}; "
             f"trained in full: {saved}; trainable token rows: {len(rows) or 'none'}; {num_params} parameters."]
    if training:
        lines += ["## Training", "\n".join(f"- {k}: {v}" for k, v in training.items())]
    lines += ["Research use only: not a medical device, not for diagnosis."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(lines) + "\n")


def save_adapter(directory: str | os.PathLike, model: nn.Module, config, *, state: dict[str, torch.Tensor],
                 base_model: str | None, training: dict | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder atomically: adapter_config.json, adapter_model.safetensors (the
    PEFT-named `state`, the base's signature in its metadata) and a README.md model card."""
    directory = Path(directory).expanduser()
    meta = {"format": "pt", "medim_base": json.dumps(base_signature(model), sort_keys=True)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(_config_dict(config, base_model), indent=2, sort_keys=True))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        _card(config, base_model=base_model, repo_id=str(directory), training=training,
              num_params=sum(t.numel() for t in state.values())).save(tmp / "README.md")
        if overwrite:  # an adapter folder is replaced; a user's files in it never are
            check_replaceable(directory, tmp, "an adapter folder", ADAPTER_CONFIG,
                              lambda config: isinstance(config, dict) and "peft_type" in config)
    return directory.resolve()


@dataclass
class Adapter:
    """An adapter as read from its folder: the LoraConfig, the PEFT-named tensors, the recorded base."""

    source: str
    config: Any
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any] | None
    base_model: str | None = None


def read_adapter(source: str | os.PathLike, hub: HubOptions | None = None) -> Adapter:
    """Read adapter_config.json and adapter_model.safetensors from a folder or a Hub repo (only
    those two files are fetched). Pickled weights (`adapter_model.bin`) are refused."""
    path = Path(source).expanduser()
    if path.is_dir():
        refuse_outside_links(path, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), "the adapter folder")
    if path.is_dir() and not (path / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        raise ValueError(f"{source}: no {ADAPTER_WEIGHTS}" + (f" ({found} found: pickled weights are never loaded, "
                                                              "only safetensors)" if found else ""))
    try:
        config_file = resolve_file(source, ADAPTER_CONFIG, hub=hub)
        weights_file = resolve_file(source, ADAPTER_WEIGHTS, hub=hub)
    except (FileNotFoundError, EntryNotFoundError) as e:  # other Hub errors (auth, network) as they are
        raise FileNotFoundError(f"{source}: not a LoRA adapter folder or repo ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} "
                                f"expected; only safetensors weights are read): {e}") from e
    try:
        data = json.loads(Path(config_file).read_text())
    except ValueError as e:
        raise ValueError(f"{source}: {ADAPTER_CONFIG} is not valid JSON ({e})") from None
    with safe_open(str(weights_file), framework="pt") as f:
        meta = f.metadata() or {}
    base = json.loads(meta["medim_base"]) if "medim_base" in meta else None
    return Adapter(str(source), _config_from_dict(data, str(source)), load_file(str(weights_file)), base,
                   data.get("base_model_name_or_path"))


def _config_from_dict(data: Any, source: str):
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise ValueError(f"{source}: {ADAPTER_CONFIG} describes no LoRA adapter (peft_type "
                         f"{data.get('peft_type') if isinstance(data, dict) else None!r})")
    defaults = _peft().LoraConfig().to_dict()
    changed = sorted(k for k, v in data.items() if k in defaults and k not in DESCRIPTIVE_KEYS | USED_KEYS
                     and v != defaults[k] and v not in (None, [], {}, False))
    if changed:
        raise ValueError(f"{source}: {ADAPTER_CONFIG} sets {changed}, which medim does not support "
                         "(plain LoRA only: r, lora_alpha, lora_dropout, target_modules, modules_to_save, use_rslora, "
                         "trainable_token_indices)")
    what = f"{source}: {ADAPTER_CONFIG}"
    check_int(data.get("r"), f"{what} r", minimum=1)
    check_number(data.get("lora_alpha"), f"{what} lora_alpha", minimum=0)
    check_number(data.get("lora_dropout", 0.0), f"{what} lora_dropout", minimum=0, maximum=1)
    for key in ("target_modules", "modules_to_save"):
        names = data.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{what} {key} must be a list of module names, got {data.get(key)!r}")
    if not data.get("target_modules"):
        raise ValueError(f"{what} names no target_modules")
    rows = data.get("trainable_token_indices") or []
    if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
        raise ValueError(f"{what} trainable_token_indices must be a list of token ids, got {rows!r}")
    targets = data["target_modules"]
    return lora_config(r=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                       target_modules=targets, modules_to_save=data.get("modules_to_save") or (),
                       use_rslora=bool(data.get("use_rslora", False)), trainable_tokens=rows)


def _expected_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """The PEFT-named tensors (and shapes) an adapter with `config` has on `model`."""
    out = {}
    for name in sorted(config.target_modules):
        for key, module in _modules(model, name):
            out[f"{PEFT_PREFIX}{key}.lora_A.weight"] = (config.r, module.in_features)
            out[f"{PEFT_PREFIX}{key}.lora_B.weight"] = (module.out_features, config.r)
    for name in config.modules_to_save or []:
        for key, module in _modules(model, name):
            out |= {f"{PEFT_PREFIX}{key}.{p}": tuple(t.shape) for p, t in module.state_dict().items()}
    rows = _token_rows(config)
    if rows:
        hidden = model.get_input_embeddings().weight.shape[1]
        out[f"{PEFT_PREFIX}{_embedding_name(model)}.token_adapter.trainable_tokens_delta"] = (len(rows), hidden)
    return out


def check_fit(model: nn.Module, adapter: Adapter) -> None:
    """Refuse an adapter whose base differs from `model` (layout, backbone shape, module names,
    tensor shapes), naming what differs; nothing in the model changes."""
    if adapter.base is not None:
        here = base_signature(model)
        for part in ("layout", "backbone"):
            old, new = adapter.base.get(part) or {}, here[part]
            diff = [f"{k}: {old.get(k)!r} in the adapter, {new.get(k)!r} here" for k in sorted(old.keys() | new.keys())
                    if old.get(k) != new.get(k)]
            if diff:
                raise ValueError(f"LoRA adapter {adapter.source} was trained on another base ({part}): "
                                 + "; ".join(diff))
    check_targets(model, sorted(adapter.config.target_modules), list(adapter.config.modules_to_save or []),
                  what=f"LoRA adapter {adapter.source}: {ADAPTER_CONFIG}")
    _check_token_rows(model, _token_rows(adapter.config), f"LoRA adapter {adapter.source}: trainable_token_indices")
    found = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
    check_state_shapes(_expected_shapes(model, adapter.config), found, f"LoRA adapter {adapter.source}")


@dataclass
class LoadedAdapter:
    """What a pipeline knows of the adapter in its model."""

    name: str
    source: str
    config: Any
    base_model: str | None = None
    fused: bool = False


def load_adapter(model: nn.Module, source: str | os.PathLike, adapter_name: str = "default",
                 hub: HubOptions | None = None) -> LoadedAdapter:
    """Read, check and inject an adapter into `model` (frozen: inference)."""
    from peft import set_peft_model_state_dict

    if any(isinstance(m, _peft().tuners.tuners_utils.BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already holds a LoRA adapter: unload_lora_weights() first")
    adapter = read_adapter(source, hub)
    check_fit(model, adapter)
    add_adapter(model, adapter.config, adapter_name)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in adapter.tensors.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:  # check_fit compared the names first; this would be a peft naming change
        unload(model, fused=False)
        raise ValueError(f"LoRA adapter {source}: peft did not take {unexpected[:5]}")
    model.requires_grad_(False)
    return LoadedAdapter(adapter_name, str(source), adapter.config, adapter.base_model)


def _merging_layers(model: nn.Module) -> list:
    """The layers that fuse into base weights: LoRA layers and trainable token rows (the tied head's
    rows follow the embedding's: one weight)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)
            or (isinstance(m, TrainableTokensLayer) and m.tied_adapter is None)]


@torch.no_grad()
def fuse(model: nn.Module, adapter_name: str) -> None:
    """Add the adapter's update into the base weights (generation then costs what the base costs)."""
    for layer in _merging_layers(model):
        layer.merge(adapter_names=[adapter_name])


@torch.no_grad()
def unfuse(model: nn.Module) -> None:
    """Subtract a fused update again (the base weights come back up to float rounding; token rows
    exactly)."""
    for layer in _merging_layers(model):
        layer.unmerge()


def unload(model: nn.Module, fused: bool) -> None:
    """Put the plain modules back. Unfused: the base model as it was. Fused: the fused weights stay
    (the adapter baked in), and modules trained in full keep their trained copy."""
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    tuner_layer = _peft().tuners.tuners_utils.BaseTunerLayer
    replaced: list[str] = []
    for key, module in list(model.named_modules()):
        if any(key.startswith(r + ".") for r in replaced):
            continue  # inside a wrapper already put back
        if isinstance(module, ModulesToSaveWrapper):
            plain = module.modules_to_save[module.active_adapter] if fused else module.original_module
        elif isinstance(module, TrainableTokensWrapper):  # fused rows are in the original's weight already
            plain = module.original_module
        elif isinstance(module, tuner_layer):
            plain = module.get_base_layer()
        else:
            continue
        replaced.append(key)
        parent, _, name = key.rpartition(".")
        setattr(model.get_submodule(parent), name, plain)
    if hasattr(model, "peft_config"):
        del model.peft_config


# ---- what MeDiMPipeline's LoRA methods call, on its model and its `lora_adapter` attribute
def loaded(adapter: LoadedAdapter | None) -> LoadedAdapter:
    """`adapter`, or the error a LoRA method gives when none is loaded."""
    if adapter is None:
        raise ValueError("no LoRA adapter is loaded: call pipe.load_lora_weights(path_or_repo_id) first")
    return adapter


def load_new(model: nn.Module, current: LoadedAdapter | None, source: str | os.PathLike, adapter_name: str | None,
             hub: HubOptions) -> LoadedAdapter:
    """Load `source` into `model` when no adapter is there yet (one adapter at a time)."""
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name.isidentifier()):
        raise ValueError(f"adapter_name must be None or a Python identifier such as 'cxr', got {adapter_name!r}")
    if current is not None:
        raise ValueError(f"adapter {current.name!r} ({current.source}) is loaded: call "
                         "pipe.unload_lora_weights() first (one adapter at a time)")
    return load_adapter(model, source, adapter_name or "default", hub)


def set_fused(model: nn.Module, adapter: LoadedAdapter, fused: bool) -> None:
    if fused and not adapter.fused:
        fuse(model, adapter.name)
    elif adapter.fused and not fused:
        unfuse(model)
    adapter.fused = fused


def push_adapter(model: nn.Module, adapter: LoadedAdapter, repo_id: str, *, base_model: str | None,
                 private: bool | None, token: str | bool | None, commit_message: str) -> str:
    """Save the loaded adapter into a temporary folder and upload it to `repo_id` (created if
    needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="medim-lora-") as tmp:
        folder = save_adapter(Path(tmp) / "adapter", model, adapter.config,
                              state=adapter_state_dict(model, adapter.name), base_model=base_model, overwrite=False)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))

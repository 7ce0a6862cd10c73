"""How a pipeline's three parts (model, VQGAN, tokenizer) are loaded and saved.

Three sources: a folder written by `MeDiMPipeline.save_pretrained` (or a bundled model by name),
the released MeDiM with its upstream pieces (Liquid's config, the Llama-2 tokenizer, the Chameleon
VQGAN), and a fresh model cut from Liquid for training. `MeDiMPipeline.from_*` call these and wrap
the parts; nothing here generates. Loading is strict: weights must match their config tensor for
tensor, and no file can make medim run code (`trust_remote_code=False`, `auto_map` refused).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from medim.layout import MeDiMV1Layout, SequenceLayout
from medim.models import convert
from medim.models.backbone import backbone_config_from_dict, fix_liquid_activation
from medim.models.medim import MeDiMConfig, MeDiMModel
from medim.models.vqgan import VQGAN
from medim.utils.checks import check_state_shapes
from medim.utils.hub import (
    HubOptions,
    atomic_directory,
    bundled_model_path,
    check_replaceable,
    looks_like_a_path,
    refuse_outside_links,
    resolve_file,
    resolve_snapshot,
)

__all__ = [
    "MODEL_INDEX",
    "MEDIM_V1_SPECIALS",
    "LOADERS",
    "detect_loader",
    "load_tokenizer",
    "load_vqgan",
    "json_object",
    "saved_pipeline_index",
    "load_saved",
    "original_parts",
    "base_model_parts",
    "save_parts",
]

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
PARTS = ("model", "vqgan", "tokenizer")
# What loading a saved pipeline downloads: the saved layout and nothing else.
PIPELINE_PATTERNS = (MODEL_INDEX, "model/*", "vqgan/*", "tokenizer/*")
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
)
# The released model's extra text tokens, in id order after the Llama-2 vocabulary (docs/formats.md).
MEDIM_V1_SPECIALS = ("<boi>", "<eoi>", "<eos>")

Parts = tuple[MeDiMModel, VQGAN, PreTrainedTokenizerBase]


def json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file."""
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


def _auto_map(value: Any) -> Any:
    """The first `auto_map` entry anywhere in a config (sub-configs included), or None."""
    if isinstance(value, dict):
        if "auto_map" in value:
            return value["auto_map"]
        return next((found for v in value.values() if (found := _auto_map(v)) is not None), None)
    return None


def _refuse_remote_code(path: Path, auto_class: str | None = None) -> None:
    """Raise if the config file `path` (when there is one) asks for code of its own (`auto_map`;
    with `auto_class`, only an entry for that class counts). medim loads only classes that ship
    with transformers and never runs code from a model folder or repo, so such a folder is refused
    rather than loaded with other classes than its author meant."""
    entry = _auto_map(json_object(path)) if path.is_file() else None
    if entry is not None and (auto_class is None or not isinstance(entry, dict) or auto_class in entry):
        raise ValueError(
            f"{path} asks for custom code (auto_map: {json.dumps(entry)[:200]}); medim never runs code from a "
            "model folder (trust_remote_code=False). Remove the auto_map entry to load it with the classes "
            "that ship with transformers."
        )


def load_tokenizer(source: Any, hub: HubOptions) -> PreTrainedTokenizerBase:
    """A tokenizer object as is, or the fast tokenizer files of a folder or Hub repo (no weights),
    with `trust_remote_code=False` (a folder asking for custom code is refused)."""
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a transformers tokenizer, a folder or a Hub repo id, "
                        f"got {type(source).__name__}")
    folder = resolve_snapshot(source, TOKENIZER_PATTERNS, hub=hub)
    _refuse_remote_code(folder / "tokenizer_config.json")
    # AutoTokenizer reads a model's config.json beside it too (a Hub snapshot may hold one); only its
    # tokenizer entry matters here: a backbone with modelling code of its own can have a plain tokenizer.
    _refuse_remote_code(folder / "config.json", "AutoTokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # the tokenizers library raises a bare Exception for a corrupt file
        if (folder / "tokenizer.json").is_file():
            json_object(folder / "tokenizer.json")  # names the file when it is not JSON at all
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise ValueError(f"could not load a tokenizer from {folder} (files: {files}): {type(e).__name__}: {e}") from e


def load_vqgan(source: Any, hub: HubOptions, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, subfolder: str | None = None,
               repo_type: str | None = None) -> VQGAN:
    """A VQGAN object, a saved medim VQGAN folder (config.json), or a taming checkpoint (file,
    folder or Hub repo, `subfolder` inside it)."""
    if isinstance(source, VQGAN):
        return source.to(device) if device is not None else source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"vqgan must be a VQGAN, a path or a Hub repo id, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return VQGAN.from_pretrained(path, dtype=dtype, device=device)
    if path.is_dir() and subfolder is not None and not (path / subfolder).is_dir():
        subfolder = None  # a local folder holding vqgan.ckpt directly
    return VQGAN.from_taming(source, subfolder=subfolder, repo_type=None if path.exists() else repo_type,
                             dtype=dtype, device=device, **hub.kwargs())


LOADERS = ("auto", "pretrained", "original")


def _absent_from_repo(err: Exception) -> bool:
    """The Hub answered that the file is not in the repo (not: offline, no such repo, no access)."""
    from huggingface_hub import errors

    remote = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    return isinstance(err, remote) and not isinstance(err, errors.LocalEntryNotFoundError)


def detect_loader(model: str | os.PathLike, *, loader: str = "auto", hub: HubOptions | None = None) -> str:
    """How to read `model`: "pretrained" (`MeDiMPipeline.from_pretrained`) or "original"
    (`from_original`, the released checkpoint), decided before any weights load.

    `loader="auto"` picks "pretrained" for a bundled name or a folder / Hub repo holding
    model_index.json, and "original" for a folder holding model.safetensors (at the top or in
    checkpoint_<step>/) or a Hub repo that answers without model_index.json. Any other failure to
    reach the Hub (offline, no such repo, no access) is raised as it is, never guessed around.

    Example:
        >>> detect_loader("medim-demo")
        'pretrained'
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {list(LOADERS)}, got {loader!r}")
    name = str(model)
    if bundled_model_path(name) is not None:
        return "pretrained" if loader == "auto" else loader
    path = Path(name).expanduser()
    if path.exists() or looks_like_a_path(name):
        if not path.exists():
            raise FileNotFoundError(f"{name}: no such folder")
        if not path.is_dir():
            raise NotADirectoryError(f"{name} is a file; give the folder that holds the model")
        if loader != "auto":
            return loader
        if (path / MODEL_INDEX).is_file():
            return "pretrained"
        if (path / "model.safetensors").is_file() or any(path.glob("checkpoint_*/model.safetensors")):
            return "original"
        raise FileNotFoundError(f"{name} holds neither a saved MeDiMPipeline ({MODEL_INDEX}) nor the released "
                                "checkpoint (model.safetensors at the top or in checkpoint_<step>/)")
    if loader != "auto":
        return loader
    try:
        resolve_file(name, MODEL_INDEX, hub=hub)
    except Exception as err:
        if _absent_from_repo(err):
            logger.info("no %s in the Hub repo %s: reading it as the released checkpoint", MODEL_INDEX, name)
            return "original"
        raise
    return "pretrained"


def check_inside(root: Path) -> None:
    """Refuse a local pipeline folder in which model_index.json or anything under model/, vqgan/ or
    tokenizer/ resolves outside the folder (a symlink to another model, to a system file): nothing
    outside a model folder is read, and no outside content reaches an error message. (A Hub
    snapshot is not checked: the cache links its files to blobs, and huggingface_hub fills it.)"""
    refuse_outside_links(root, (MODEL_INDEX, *PARTS), "the pipeline folder")


def saved_pipeline_index(repo_or_dir: str | os.PathLike, hub: HubOptions,
                         patterns: tuple[str, ...] = PIPELINE_PATTERNS) -> tuple[Path, dict[str, Any]]:
    """The local folder of a saved pipeline (a folder, a Hub repo fetched with `patterns`, or a
    bundled model's name) and its model_index.json, checked to be a JSON object. Errors say which:
    no such folder, a folder that is not a saved pipeline, or a name the Hub does not have."""
    bundled = bundled_model_path(repo_or_dir)
    name = str(repo_or_dir)
    path = Path(name).expanduser()
    if bundled is not None:
        root = bundled
    elif path.is_dir():
        root = path
        check_inside(root)
    elif path.exists():
        raise NotADirectoryError(f"{name} is a file, not a folder holding a saved MeDiMPipeline")
    elif looks_like_a_path(name):
        raise FileNotFoundError(f"{name}: no such folder")
    else:
        try:
            root = resolve_snapshot(name, patterns, hub=hub)
        except (OSError, ValueError) as e:  # not found, offline, or not a valid repo id
            raise FileNotFoundError(f"{name}: no such folder, and no Hub repo of that name could be loaded "
                                    f"({type(e).__name__}: {e})") from e
    index_path = root / MODEL_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{name} holds no {MODEL_INDEX}: not a saved MeDiMPipeline (for the released checkpoint use "
            "MeDiMPipeline.from_original)"
        )
    return root, json_object(index_path)


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a transformers save (one safetensors file or an index of
    shards), read from the file headers only. Pickled weights are never read."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map object")
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if outside:
            raise ValueError(f"{index} names shard files outside {folder}: {outside}")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} holds no model.safetensors or model.safetensors.index.json "
                                "(medim reads weights only from safetensors)")
    shapes = {}
    for file in files:
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (OSError, SafetensorError) as e:
            raise ValueError(f"could not read {folder / file} as safetensors: {e}") from e
    return shapes


def _load_model(folder: Path, dtype: torch.dtype) -> MeDiMModel:
    """The saved model, after checking that its weights are exactly those its config.json builds:
    transformers would load a mismatch (a changed layer count or weight tying) with a printed
    report, fresh random tensors where weights are missing, and different samples."""
    _refuse_remote_code(folder / "config.json")
    config = MeDiMConfig.from_dict(json_object(folder / "config.json"))
    with torch.device("meta"):  # only names and shapes: nothing allocated
        skeleton = MeDiMModel(config)
    expected, seen = {}, set()
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied weight is saved once, under its first name
            expected[name] = tuple(tensor.shape)
            seen.add(id(tensor))
    check_state_shapes(expected, _saved_shapes(folder), f"the weights in {folder} (config: {folder / 'config.json'})")
    return MeDiMModel.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False)


def load_saved(repo_or_dir: str | os.PathLike, hub: HubOptions, dtype: torch.dtype | None,
               device: torch.device | None) -> tuple[Parts, dict[str, Any]]:
    """The parts of a saved pipeline (a folder, a Hub repo, or a bundled model's name) and its
    model_index.json. The parts are read from the fixed subfolders model/, vqgan/ and tokenizer/,
    never from paths in model_index.json, so nothing outside the folder is read."""
    root, index = saved_pipeline_index(repo_or_dir, hub)
    for part in PARTS:
        if not (root / part).is_dir():
            raise FileNotFoundError(f"{root} has no {part}/ folder (a saved pipeline holds model/, vqgan/, tokenizer/)")
    model = _load_model(root / "model", dtype or torch.float32)
    if device is not None:
        model.to(device)
    if model.layout.to_dict() != index.get("layout"):
        raise ValueError(f"{root / MODEL_INDEX} layout {index.get('layout')} differs from model/config.json's "
                         f"{model.layout.to_dict()}")
    vqgan = VQGAN.from_pretrained(root / "vqgan", dtype=dtype, device=device)
    tokenizer = load_tokenizer(root / "tokenizer", hub)
    return (model, vqgan, tokenizer), index


def original_parts(
    checkpoint: str | os.PathLike | MeDiMModel,
    *,
    backbone: str | os.PathLike | PretrainedConfig | None,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase,
    vqgan: str | os.PathLike | VQGAN,
    vqgan_subfolder: str | None,
    vqgan_repo_type: str | None,
    num_layers: int,
    layout: dict[str, Any] | SequenceLayout | None,
    hub: HubOptions,
    dtype: torch.dtype | None,
    device: torch.device | None,
) -> Parts:
    """The released MeDiM (medim-v1 layout) from its upstream pieces; `hub.revision` applies to
    `checkpoint` only. See `MeDiMPipeline.from_original` for the arguments."""
    others = hub.without_revision()
    layout = SequenceLayout.from_dict(layout if layout is not None else MeDiMV1Layout().to_dict())
    if not isinstance(layout, MeDiMV1Layout):
        raise ValueError(f"from_original needs the medim-v1 layout, got {layout.name!r}")
    if isinstance(checkpoint, MeDiMModel):
        model = checkpoint
    else:
        config = None
        if backbone is not None:
            if isinstance(backbone, (str, os.PathLike)):
                params = json.loads(resolve_file(backbone, "config.json", hub=others).read_text())
                config = backbone_config_from_dict(fix_liquid_activation(params))
            else:
                config = backbone.__class__.from_dict(backbone.to_dict())
            config.num_hidden_layers = num_layers
            config.vocab_size = layout.min_vocab_size
        model = convert.load_original(MeDiMModel, checkpoint, backbone_config=config, layout=layout.to_dict(),
                                      dtype=dtype, device=device, hub=hub)
    tok = load_tokenizer(tokenizer, others)
    tok.add_tokens([t for t in MEDIM_V1_SPECIALS if t not in tok.get_vocab()], special_tokens=True)
    ids = tok.convert_tokens_to_ids(list(MEDIM_V1_SPECIALS))
    expected = [model.layout.boi_id, model.layout.eoi_id, model.layout.eos_id]
    if ids != expected:
        raise ValueError(f"tokenizer puts {list(MEDIM_V1_SPECIALS)} at ids {ids}; the medim-v1 layout needs {expected} "
                         f"(a Llama-2 tokenizer of {model.layout.base_vocab_size} tokens)")
    vq = load_vqgan(vqgan, others, dtype=dtype, device=device, subfolder=vqgan_subfolder, repo_type=vqgan_repo_type)
    return model, vq, tok


def base_model_parts(
    backbone: str | os.PathLike,
    *,
    vqgan: str | os.PathLike | VQGAN,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None,
    num_layers: int,
    layout: str | dict[str, Any],
    vqgan_subfolder: str | None,
    vqgan_repo_type: str | None,
    text_len: int,
    image_len: int,
    image_offset: int | None,
    hub: HubOptions,
    dtype: torch.dtype | None,
    device: torch.device | None,
) -> Parts:
    """A fresh MeDiM cut from an MLLM backbone, its own tokenizer unless one is given, and a VQGAN
    whose codebook sizes the image vocabulary; `hub.revision` applies to `backbone` only."""
    others = hub.without_revision()
    vq = load_vqgan(vqgan, others, dtype=dtype, device=device, subfolder=vqgan_subfolder, repo_type=vqgan_repo_type)
    model = convert.load_liquid(MeDiMModel, backbone, num_layers=num_layers, layout=layout, dtype=dtype, device=device,
                                image_offset=image_offset, image_vocab_size=vq.num_codes, text_len=text_len,
                                image_len=image_len, hub=hub)
    tok = load_tokenizer(backbone, hub) if tokenizer is None else load_tokenizer(tokenizer, others)
    return model, vq, tok


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 saves a plain fast tokenizer as class "TokenizersBackend", a name 4.57 does not
    know; "PreTrainedTokenizerFast" names the same tokenizer and loads on both lines."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2) + "\n")


def save_parts(directory: str | os.PathLike, parts: Parts, index: dict[str, Any], *, max_shard_size: int | str,
               overwrite: bool) -> Path:
    """Write model_index.json (`index`) + model/ + vqgan/ + tokenizer/ atomically (safetensors and
    JSON only); an existing non-empty folder is replaced only with `overwrite=True`."""
    model, vqgan, tokenizer = parts
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp / "model", max_shard_size=max_shard_size, safe_serialization=True)
        vqgan.save_pretrained(tmp / "vqgan")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _portable_tokenizer_class(tmp / "tokenizer")
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return Path(directory).expanduser().resolve()


# Files one save writes and another save of the same pipeline may not: the shard layout follows
# max_shard_size. The card (README.md) is kept or replaced by the caller.
_ALSO_SAVED = re.compile(r"model/model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|README\.md")


def check_pipeline_replaceable(target: Path, written: Path) -> None:
    """Before `overwrite=True` replaces `target` with the new save `written`: refuse (FileExistsError)
    when `target` is not a saved pipeline (no model_index.json of medim's) or holds files a save
    does not write, naming them; a user's files are never deleted by a save."""
    check_replaceable(target, written, "a saved pipeline", MODEL_INDEX,
                      lambda index: isinstance(index, dict) and {"_class_name", "_medim_version"} <= set(index),
                      also=_ALSO_SAVED)

"""MeDiMPipeline: the public API. Loading, saving, the three tasks, batching, outputs.

A pipeline holds the three parts a MeDiM model needs: the denoiser (`MeDiMModel`), the image
tokenizer (`VQGAN`) and the text tokenizer. Every task is one call of the shared sampler with a
different set of known positions (medim/diffusion/tasks.py); the pipeline only turns user inputs
into token states and token states back into images and reports.

Example:
    >>> import torch
    >>> from medim import MeDiMPipeline
    >>> pipe = MeDiMPipeline.from_original(dtype=torch.bfloat16, device="cuda")   # released weights
    >>> out = pipe.text_to_image(["No acute cardiopulmonary process."], generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("cxr.png")
    >>> pipe.image_to_report(["cxr.png"]).reports
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from medim.data.images import ImageInput, load_image, postprocess, preprocess
from medim.demo import DEMO_NAME, demo_path
from medim.diffusion import tasks
from medim.diffusion.sampler import STRATEGIES, sample
from medim.hub import atomic_directory, resolve_file, resolve_snapshot
from medim.layout import MeDiMV1Layout, SequenceLayout
from medim.models.convert import fix_liquid_activation
from medim.models.medim import MeDiMModel, backbone_config_from_dict
from medim.models.vqgan import VQGAN

__all__ = ["MeDiMPipeline", "MeDiMOutput", "SAMPLER_DEFAULTS"]

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# What from_pretrained downloads: the saved layout and nothing else.
PIPELINE_PATTERNS = (MODEL_INDEX, "model/*", "vqgan/*", "tokenizer/*")
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
)
# The released model's extra text tokens, in id order after the Llama-2 vocabulary (FORMATS 4).
MEDIM_V1_SPECIALS = ("<boi>", "<eoi>", "<eos>")
OUTPUT_TYPES = ("pil", "pt", "tokens")
TASK_NAMES = {"text_to_image": "text_to_image", "image": "text_to_image", "image_to_report": "image_to_report",
              "report": "image_to_report", "generate_pairs": "generate_pairs", "pairs": "generate_pairs"}

# Sampler settings per layout, stored in model_index.json and overridable per call. medim-v1 is the
# release's: MaskGIT with the arccos commit schedule, 128 steps, confidence temperature 10 and
# CFG 5 ramped as 5 * (1 - t). A native model starts from the same settings.
_RELEASE_SAMPLER = dict(
    num_steps=128, strategy="maskgit", schedule="arccos", confidence_temperature=10.0,
    guidance_scale=5.0, guidance_schedule="linear", temperature=1.0,
)
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {"medim-v1": dict(_RELEASE_SAMPLER), "native": dict(_RELEASE_SAMPLER)}
# Sampler options a caller may set (through sampler_kwargs or the named arguments).
_SAMPLER_OPTIONS = tuple(
    name for name, p in inspect.signature(sample).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in ("segments", "mask_id", "generator", "model_kwargs", "callback", "progress")
)


@dataclass
class MeDiMOutput:
    """What a generation call returns.

    Attributes:
        images: generated (or, for image_to_report, the input) images: a list of RGB PIL images
            (`output_type="pil"`), a float tensor [B, 3, H, W] in [0, 1] ("pt") or the VQ codes
            LongTensor [B, image_len] ("tokens").
        reports: generated reports (or, for text_to_image, the prompts), one str per output.
        tokens: the final diffusion states [B, state_len] (backbone ids).
        nfe: network evaluations spent, summed over batch chunks.
    """

    images: list[Image.Image] | torch.Tensor | None = None
    reports: list[str] | None = None
    tokens: torch.LongTensor | None = None
    nfe: int = 0


def _hub_kwargs(revision, cache_dir, local_files_only, token) -> dict[str, Any]:
    return dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)


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


def _load_tokenizer(source: Any, hub: dict[str, Any]) -> PreTrainedTokenizerBase:
    """A tokenizer object as is, or the fast tokenizer files of a folder or Hub repo (no weights)."""
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a transformers tokenizer, a folder or a Hub repo id, got {type(source).__name__}")
    return AutoTokenizer.from_pretrained(str(resolve_snapshot(source, TOKENIZER_PATTERNS, **hub)))


def _load_vqgan(source: Any, hub: dict[str, Any], dtype, device, subfolder: str | None, repo_type: str | None) -> VQGAN:
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
                             dtype=dtype, device=device, **hub)


def _check_generator(generator: Any) -> None:
    items = generator if isinstance(generator, (list, tuple)) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in items) or (
        isinstance(generator, (list, tuple)) and None in generator
    ):
        raise TypeError(f"generator must be None, a torch.Generator or a list of them (one per output), got {generator!r}")


class MeDiMPipeline:
    """Unified medical image and report generation with MeDiM.

    Args:
        model: the denoiser.
        vqgan: the image tokenizer; its codebook size must match the layout's image vocabulary.
        tokenizer: the text tokenizer the layout's text ids come from.
        sampler_defaults: sampler settings used when a call does not set them (names of
            `medim.diffusion.sampler.sample`); default: `SAMPLER_DEFAULTS[layout name]`.

    Example:
        >>> pipe = MeDiMPipeline.from_pretrained("path/or/org-repo", dtype=torch.bfloat16, device="cuda")
        >>> out = pipe.generate_pairs(["The image is a radiograph of the chest"], num_pairs_per_prompt=4)
        >>> out.images, out.reports
    """

    def __init__(
        self,
        model: MeDiMModel,
        vqgan: VQGAN,
        tokenizer: PreTrainedTokenizerBase,
        sampler_defaults: dict[str, Any] | None = None,
    ):
        if not isinstance(model, MeDiMModel):
            raise TypeError(f"model must be a MeDiMModel, got {type(model).__name__}")
        if not isinstance(vqgan, VQGAN):
            raise TypeError(f"vqgan must be a VQGAN, got {type(vqgan).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.model, self.vqgan, self.tokenizer = model.eval(), vqgan.eval(), tokenizer
        self.layout: SequenceLayout = model.layout
        image = self.layout.image_segment
        if vqgan.num_codes != image.vocab_size:
            raise ValueError(f"vqgan has {vqgan.num_codes} codes but the layout's image vocabulary has {image.vocab_size}")
        side = int(image.length**0.5)
        if side * side != image.length:
            raise ValueError(f"image_len={image.length} is not a square grid of codes")
        # Pixels per image side: the VQGAN turns image_size x image_size pixels into image_len codes.
        self.image_resolution = side * vqgan.downsample_factor
        unknown = set(sampler_defaults or {}) - set(_SAMPLER_OPTIONS)
        if unknown:
            raise ValueError(f"sampler_defaults: unknown options {sorted(unknown)}; accepted: {list(_SAMPLER_OPTIONS)}")
        self.sampler_defaults = {**SAMPLER_DEFAULTS.get(self.layout.name, _RELEASE_SAMPLER), **(sampler_defaults or {})}
        self._progress_bar_config: dict[str, Any] = {}

    # ---- devices -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MeDiMPipeline:
        """Move the model and VQGAN; the VQGAN's codebook stays float32 (nearest-code search in bf16
        flips codes). Returns self."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
        self.model.to(device=device, dtype=dtype)
        self.vqgan.to(device=device)
        if dtype is not None:
            for name, module in self.vqgan.named_children():
                if name != "quantize":
                    module.to(dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the sampling bar, e.g. `disable=True`."""
        self._progress_bar_config = dict(kwargs)

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MeDiMPipeline:
        """Load a pipeline written by `save_pretrained` from a folder or a Hub repo (only
        model_index.json, model/, vqgan/ and tokenizer/ are downloaded).

        The name "medim-demo" loads the tiny phantom model that ships inside medim (no network;
        see `medim.demo`); write "./medim-demo" for a local folder of that name.

        Example:
            >>> pipe = MeDiMPipeline.from_pretrained("org/medim-cxr", dtype=torch.bfloat16, device="cuda")
        """
        if str(repo_or_dir) == DEMO_NAME:
            repo_or_dir = demo_path()
            if not (repo_or_dir / MODEL_INDEX).is_file():
                raise FileNotFoundError(
                    f"this build of medim has no bundled demo model ({repo_or_dir} is empty); build one with "
                    "`medim demo --retrain DIR` (about 1 h 45 min on two CPU cores) and load DIR instead"
                )
        hub = _hub_kwargs(revision, cache_dir, local_files_only, token)
        root = resolve_snapshot(repo_or_dir, PIPELINE_PATTERNS, **hub)
        index_path = root / MODEL_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{repo_or_dir} holds no {MODEL_INDEX}: not a saved MeDiMPipeline (for the released "
                "checkpoint use MeDiMPipeline.from_original)"
            )
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path} is not valid JSON: {e}") from e
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')!r}, not a {cls.__name__}")
        for part in ("model", "vqgan", "tokenizer"):
            if not (root / part).is_dir():
                raise FileNotFoundError(f"{root} has no {part}/ folder (a saved pipeline holds model/, vqgan/, tokenizer/)")
        model = MeDiMModel.from_pretrained(root / "model", dtype=dtype or torch.float32)
        if device is not None:
            model.to(device)
        if model.layout.to_dict() != index.get("layout"):
            raise ValueError(f"{index_path} layout {index.get('layout')} differs from model/config.json's {model.layout.to_dict()}")
        vqgan = VQGAN.from_pretrained(root / "vqgan", dtype=dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
        return cls(model, vqgan, tokenizer, sampler_defaults=index.get("sampler"))

    @classmethod
    def from_original(
        cls,
        checkpoint: str | os.PathLike | MeDiMModel = "JiaMao/medim_ckpts",
        *,
        backbone: str | os.PathLike | AutoConfig | None = "Junfeng5/Liquid_V1_7B",
        tokenizer: str | os.PathLike | PreTrainedTokenizerBase = "NousResearch/Llama-2-7b-hf",
        vqgan: str | os.PathLike | VQGAN = "Junfeng5/Liquid_demo",
        vqgan_subfolder: str | None = "chameleon",
        vqgan_repo_type: str | None = "space",
        num_layers: int = 10,
        layout: dict[str, Any] | SequenceLayout | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MeDiMPipeline:
        """The released MeDiM (medim-v1 layout), assembled from its upstream pieces.

        Args:
            checkpoint: the release (a repo or folder with `model.safetensors` at the top or in
                `checkpoint_<step>/`), or a MeDiMModel already loaded. `revision` applies to it.
            backbone: where the Gemma config comes from (only config.json is read), a config
                object, or None for Liquid's built-in config. It is cut to `num_layers` layers and
                sized to the layout's vocabulary.
            tokenizer: Llama-2 tokenizer files (folder, repo or object); `<boi> <eoi> <eos>` are
                added when missing and must land on the layout's ids.
            vqgan: Chameleon VQGAN: a taming checkpoint (folder, file or repo, `vqgan_subfolder`
                inside it, `vqgan_repo_type` on the Hub), a saved medim VQGAN folder, or an object.
            layout: the medim-v1 layout parameters (default: the release's 256 text + 1024 image).
            cache_dir, local_files_only, token, dtype, device: as for `from_pretrained`.

        Example:
            >>> pipe = MeDiMPipeline.from_original("JiaMao/medim_ckpts", dtype=torch.float16, device="cuda")
        """
        hub = _hub_kwargs(None, cache_dir, local_files_only, token)
        layout = SequenceLayout.from_dict(layout if layout is not None else MeDiMV1Layout().to_dict())
        if not isinstance(layout, MeDiMV1Layout):
            raise ValueError(f"from_original needs the medim-v1 layout, got {layout.name!r}")
        if isinstance(checkpoint, MeDiMModel):
            model = checkpoint
        else:
            config = None
            if backbone is not None:
                if isinstance(backbone, (str, os.PathLike)):
                    params = fix_liquid_activation(json.loads(resolve_file(backbone, "config.json", **hub).read_text()))
                    config = backbone_config_from_dict(params)
                else:
                    config = backbone.__class__.from_dict(backbone.to_dict())
                config.num_hidden_layers = num_layers
                config.vocab_size = layout.min_vocab_size
            model = MeDiMModel.from_original(
                checkpoint, backbone_config=config, layout=layout.to_dict(), dtype=dtype, device=device,
                **_hub_kwargs(revision, cache_dir, local_files_only, token),
            )
        tok = _load_tokenizer(tokenizer, hub)
        tok.add_tokens([t for t in MEDIM_V1_SPECIALS if t not in tok.get_vocab()], special_tokens=True)
        ids = tok.convert_tokens_to_ids(list(MEDIM_V1_SPECIALS))
        expected = [model.layout.boi_id, model.layout.eoi_id, model.layout.end_id]
        if ids != expected:
            raise ValueError(f"tokenizer puts {list(MEDIM_V1_SPECIALS)} at ids {ids}; the medim-v1 layout needs {expected} "
                             f"(a Llama-2 tokenizer of {model.layout.base_vocab_size} tokens)")
        vq = _load_vqgan(vqgan, hub, dtype, device, vqgan_subfolder, vqgan_repo_type)
        return cls(model, vq, tok)

    @classmethod
    def from_base_models(
        cls,
        backbone: str | os.PathLike = "Junfeng5/Liquid_V1_7B",
        *,
        vqgan: str | os.PathLike | VQGAN = "Junfeng5/Liquid_demo",
        tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
        num_layers: int = 10,
        layout: str | dict[str, Any] = "native",
        vqgan_subfolder: str | None = "chameleon",
        vqgan_repo_type: str | None = "space",
        text_len: int = 256,
        image_len: int = 1024,
        image_offset: int | None = 256000,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MeDiMPipeline:
        """A fresh MeDiM ready for training: the first `num_layers` layers of an MLLM backbone
        (Liquid by default; see `MeDiMModel.from_liquid`), its own tokenizer unless `tokenizer`
        is given, and a VQGAN whose codebook matches the layout's image vocabulary.

        Example:
            >>> pipe = MeDiMPipeline.from_base_models("Junfeng5/Liquid_V1_7B", num_layers=10, dtype=torch.bfloat16)
        """
        hub = _hub_kwargs(None, cache_dir, local_files_only, token)
        vq = _load_vqgan(vqgan, hub, dtype, device, vqgan_subfolder, vqgan_repo_type)
        model = MeDiMModel.from_liquid(
            backbone, num_layers=num_layers, layout=layout, dtype=dtype, device=device, image_offset=image_offset,
            image_vocab_size=vq.num_codes, text_len=text_len, image_len=image_len,
            **_hub_kwargs(revision, cache_dir, local_files_only, token),
        )
        if tokenizer is None:
            tok = _load_tokenizer(backbone, _hub_kwargs(revision, cache_dir, local_files_only, token))
        else:
            tok = _load_tokenizer(tokenizer, hub)
        return cls(model, vq, tok)

    # ---- saving ------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB", overwrite: bool = False
    ) -> Path:
        """Write model_index.json + model/ + vqgan/ + tokenizer/ (safetensors and JSON only)
        atomically: an existing non-empty folder is replaced only with `overwrite=True`.

        Example:
            >>> pipe.save_pretrained("medim-cxr", max_shard_size="2GB")
        """
        import transformers

        from medim import __version__

        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp / "model", max_shard_size=max_shard_size, safe_serialization=True)
            self.vqgan.save_pretrained(tmp / "vqgan")
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            _portable_tokenizer_class(tmp / "tokenizer")
            index = {
                "_class_name": type(self).__name__,
                "_medim_version": __version__,
                "_transformers_version": transformers.__version__,
                "_torch_version": torch.__version__,
                "layout": self.layout.to_dict(),
                "sampler": self.sampler_defaults,
                "model": ["medim", type(self.model).__name__],
                "vqgan": ["medim", type(self.vqgan).__name__],
                "tokenizer": ["transformers", type(self.tokenizer).__name__],
            }
            (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return Path(save_directory).expanduser().resolve()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload MeDiMPipeline",
        max_shard_size: int | str = "5GB",
        revision: str | None = None,
    ) -> str:
        """Save into a temporary folder and upload it to `repo_id` (created if needed). Returns the
        commit URL.

        Example:
            >>> pipe.push_to_hub("my-org/medim-cxr", private=True)
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="medim-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "pipeline", max_shard_size=max_shard_size)
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                       revision=revision)
        return str(getattr(commit, "commit_url", commit))

    # ---- generation --------------------------------------------------------------------------
    def __call__(self, task: str, *args: Any, **kwargs: Any) -> MeDiMOutput | tuple:
        """Dispatch: `pipe("text_to_image" | "image", ...)`, `pipe("image_to_report" | "report", ...)`,
        `pipe("generate_pairs" | "pairs", ...)`."""
        if task not in TASK_NAMES:
            raise ValueError(f"task must be one of {sorted(TASK_NAMES)}, got {task!r}")
        return getattr(self, TASK_NAMES[task])(*args, **kwargs)

    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        strategy: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
    ) -> MeDiMOutput | tuple:
        """Generate one image per report.

        Args:
            prompts: reports (list of str); longer than the text slots -> truncated with a warning.
            image_size: (width, height) the model is told the image has (the medim-v1 size
                condition); the output has the VQGAN's resolution.
            num_inference_steps, guidance_scale, strategy, temperature, top_k, top_p: sampler
                settings (None: the pipeline's defaults); `sampler_kwargs` sets any other option
                of `medim.diffusion.sampler.sample` (e.g. `schedule`, `confidence_temperature`).
            generator: one generator, or one per output. Outputs do not depend on `batch_size`.
            batch_size: outputs per forward batch (None: all at once).
            output_type: "pil", "pt" (float [B, 3, H, W] in [0, 1]) or "tokens" (VQ codes).
            return_dict: False returns `(images, reports)`.
            callback_on_step_end: `fn(pipe, step, t, tokens)` after every step of every chunk.

        Example:
            >>> pipe.text_to_image(["Small left pleural effusion."], num_inference_steps=64).images[0]
        """
        opts = self._options(num_inference_steps, guidance_scale, strategy, temperature, top_k, top_p,
                             sampler_kwargs, batch_size, output_type, generator, callback_on_step_end)
        prompts = self._check_prompts(prompts, "prompts")
        sizes = self._check_image_size(image_size, len(prompts))
        ids = self.layout.encode_reports(self.tokenizer, prompts)
        task = tasks.text_to_image(self.layout, ids)
        out = self._run(task, self.layout.condition(self.tokenizer, sizes), opts)
        out.images = self._images(out.tokens, output_type, opts["batch_size"])
        out.reports = list(prompts)
        return out if return_dict else (out.images, out.reports)

    def image_to_report(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        strategy: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
    ) -> MeDiMOutput | tuple:
        """Write one report per image.

        Args:
            images: PIL images (any mode: grayscale and 16-bit X-rays are converted), paths,
                numpy arrays or tensors (see `medim.data.images.load_image`). They are padded to
                square and resized to the VQGAN's resolution; the original size is the medim-v1
                size condition.
            prompt: optional beginning every report starts with (one str, or one per image),
                kept fixed while the rest is generated.
            Other arguments: as for `text_to_image`. `out.images` are the inputs as RGB PIL images
            ("pil"), the model's input pixels in [0, 1] ("pt") or their VQ codes ("tokens").

        Example:
            >>> pipe.image_to_report(["cxr.png"], prompt="The image is a radiograph of the chest").reports
        """
        opts = self._options(num_inference_steps, guidance_scale, strategy, temperature, top_k, top_p,
                             sampler_kwargs, batch_size, output_type, generator, callback_on_step_end)
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is empty: pass at least one image")
            batch = list(images)
        else:
            batch = [images]
        rgb = [load_image(image) for image in batch]  # raises on wrong types/modes before any compute
        prompts = None
        if prompt is not None:
            prompts = [prompt] * len(rgb) if isinstance(prompt, str) else self._check_prompts(prompt, "prompt")
            if len(prompts) != len(rgb):
                raise ValueError(f"prompt: give one str or one per image ({len(rgb)}), got {len(prompts)}")
        pixels, sizes = preprocess(rgb, size=self.image_resolution, return_sizes=True)
        codes = torch.cat([self.vqgan.encode(p.to(self.vqgan.device)) for p in pixels.split(opts["batch_size"])])
        task = tasks.image_to_report(self.layout, codes.to(self.device))
        if prompts is not None:
            given = self._prompt_task(prompts)
            task = tasks.TaskInputs(torch.where(given.known, given.x, task.x), given.known | task.known)
        out = self._run(task, self.layout.condition(self.tokenizer, sizes), opts)
        out.reports = self.layout.decode_reports(self.tokenizer, out.tokens)
        if output_type == "pil":
            out.images = rgb
        elif output_type == "pt":
            out.images = (pixels + 1) / 2
        else:
            out.images = codes
        return out if return_dict else (out.images, out.reports)

    def generate_pairs(
        self,
        prompts: Sequence[str],
        *,
        num_pairs_per_prompt: int = 1,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        strategy: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler_kwargs: dict[str, Any] | None = None,
    ) -> MeDiMOutput | tuple:
        """Generate image-report pairs together; each report starts with its prompt ("" for none).

        Outputs are prompt-major: prompt 0's `num_pairs_per_prompt` pairs, then prompt 1's, ...
        A list of generators needs one per output (`len(prompts) * num_pairs_per_prompt`).
        Other arguments: as for `text_to_image`.

        Example:
            >>> out = pipe.generate_pairs(["The image is a radiograph of the chest"], num_pairs_per_prompt=4)
            >>> out.images[0], out.reports[0]
        """
        if isinstance(num_pairs_per_prompt, bool) or not isinstance(num_pairs_per_prompt, int) or num_pairs_per_prompt < 1:
            raise ValueError(f"num_pairs_per_prompt must be an int >= 1, got {num_pairs_per_prompt!r}")
        opts = self._options(num_inference_steps, guidance_scale, strategy, temperature, top_k, top_p,
                             sampler_kwargs, batch_size, output_type, generator, callback_on_step_end)
        prompts = [p for p in self._check_prompts(prompts, "prompts", allow_empty_text=True)
                   for _ in range(num_pairs_per_prompt)]
        sizes = self._check_image_size(image_size, len(prompts))
        out = self._run(self._prompt_task(prompts), self.layout.condition(self.tokenizer, sizes), opts)
        out.images = self._images(out.tokens, output_type, opts["batch_size"])
        out.reports = self.layout.decode_reports(self.tokenizer, out.tokens)
        return out if return_dict else (out.images, out.reports)

    # ---- internals ---------------------------------------------------------------------------
    def _options(self, num_inference_steps, guidance_scale, strategy, temperature, top_k, top_p,
                 sampler_kwargs, batch_size, output_type, generator, callback) -> dict[str, Any]:
        """Check every user setting before any compute; returns the sampler kwargs + pipeline options."""
        extra = dict(sampler_kwargs or {})
        unknown = set(extra) - set(_SAMPLER_OPTIONS)
        if unknown:
            raise ValueError(f"sampler_kwargs: unknown options {sorted(unknown)}; accepted: {list(_SAMPLER_OPTIONS)}")
        named = dict(num_steps=num_inference_steps, guidance_scale=guidance_scale, strategy=strategy,
                     temperature=temperature, top_k=top_k, top_p=top_p)
        settings = {**self.sampler_defaults, **extra, **{k: v for k, v in named.items() if v is not None}}
        steps = settings["num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        g = settings["guidance_scale"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (0 turns guidance off), got {g!r}")
        if settings["strategy"] not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {settings['strategy']!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        _check_generator(generator)
        return dict(sampler=settings, batch_size=batch_size or 2**31, generator=generator, callback=callback)

    @staticmethod
    def _check_prompts(prompts: Any, name: str, allow_empty_text: bool = False) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"{name} must be a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError(f"{name} is empty: pass at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(p).__name__}")
            if not allow_empty_text and not p.strip():
                raise ValueError(f"{name}[{i}] is empty")
        return list(prompts)

    @staticmethod
    def _check_image_size(image_size: Any, n: int) -> list[tuple[int, int]]:
        ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size))
        if not ok:
            raise ValueError(f"image_size must be (width, height) positive ints, got {image_size!r}")
        return [tuple(image_size)] * n

    def _prompt_task(self, prompts: list[str]) -> tasks.TaskInputs:
        """Report beginnings known, everything else unknown. A prompt's tokens are its encoded
        report up to padding or the end-of-report id (which must stay free to move)."""
        ids = self.layout.encode_reports(self.tokenizer, prompts)
        real = ids != self.layout.pad_id
        if self.layout.eos_id is not None:
            real &= ids != self.layout.eos_id
        lengths = real.long().cumprod(1).sum(1)
        return tasks.pair_from_prompt(self.layout, ids.to(self.device), lengths)

    def _generators(self, generator: Any, n: int) -> list[torch.Generator]:
        """One generator per output, so a row's sample does not depend on how outputs are chunked.
        A single generator (or None: torch's global RNG) seeds the per-output ones."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"generator: a list needs one generator per output ({n}), got {len(generator)}")
            return list(generator)
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**62, (n,), generator=generator, device=device).tolist()
        return [torch.Generator(self.device).manual_seed(s) for s in seeds]

    def _run(self, task: tasks.TaskInputs, condition: dict[str, torch.Tensor], opts: dict[str, Any]) -> MeDiMOutput:
        """Sample the task in chunks of `batch_size` rows with one generator per row."""
        n, size = task.x.shape[0], opts["batch_size"]
        generators = self._generators(opts["generator"], n)
        x, known = task.x.to(self.device), task.known.to(self.device)
        condition = {k: v.to(self.device) for k, v in condition.items()}
        settings = opts["sampler"]
        chunks = range(0, n, size)
        bar = tqdm(total=len(chunks) * settings["num_steps"], desc="MeDiM", **self._progress_bar_config)

        def denoiser(xt, sigma, positions, **kwargs):
            # Raw logits: the sampler normalises them itself (it is invariant to a per-position
            # constant), so the model's log-softmax over every row would be a wasted pass.
            return self.model(xt, sigma, positions=positions, return_logits=True, **kwargs).logprobs

        def on_step(step: int, t: float, tokens: torch.Tensor) -> None:
            bar.update(1)
            if opts["callback"] is not None:
                opts["callback"](self, step, t, tokens)

        tokens, nfe = [], 0
        with torch.inference_mode(), bar:
            for start in chunks:
                rows = slice(start, start + size)
                result = sample(
                    denoiser, x[rows], known[rows], segments=self.layout.segments, mask_id=self.layout.mask_id,
                    generator=generators[rows], model_kwargs={k: v[rows] for k, v in condition.items()},
                    callback=on_step, **settings,
                )
                tokens.append(result.tokens)
                nfe += result.nfe
        return MeDiMOutput(tokens=torch.cat(tokens), nfe=nfe)

    def _images(self, tokens: torch.Tensor, output_type: str, batch_size: int) -> list[Image.Image] | torch.Tensor:
        image = self.layout.image_segment
        codes = tokens[:, image.start : image.stop] - image.vocab_start
        if output_type == "tokens":
            return codes
        pixels = torch.cat([self.vqgan.decode(c).float().cpu() for c in codes.split(batch_size)])
        return postprocess(pixels) if output_type == "pil" else (pixels + 1) / 2

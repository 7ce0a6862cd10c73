"""MeDiMPipeline: the public API. Load, save, the three tasks, input checks, batching, outputs.

A pipeline holds the three parts a MeDiM model needs: the denoiser (`MeDiMModel`), the image
tokenizer (`VQGAN`) and the text tokenizer. Every task is one call of the shared sampler with a
different set of known positions (medim/diffusion/tasks.py); the pipeline only checks user inputs,
turns them into token states and turns token states back into images and reports. Where the parts
come from is medim/loaders.py.

Example:
    >>> import torch
    >>> from medim import MeDiMPipeline
    >>> pipe = MeDiMPipeline.from_pretrained("medim-demo")          # ships with medim, no download
    >>> out = pipe.text_to_image(["A large dense nodule in the right upper zone."],
    ...                          generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("phantom.png")
    >>> pipe.image_to_report(["phantom.png"]).reports
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from medim import generation as gen
from medim import loaders
from medim.checks import check_dtype_device
from medim.data.images import ImageInput, load_image, preprocess
from medim.diffusion import tasks
from medim.diffusion.config import RELEASE_SAMPLER, SamplerConfig
from medim.hub import HubOptions
from medim.layout import SequenceLayout
from medim.models.medim import MeDiMModel
from medim.models.vqgan import VQGAN
from medim.task_names import TASKS

__all__ = ["MeDiMPipeline", "MeDiMOutput"]

logger = logging.getLogger(__name__)


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


class MeDiMPipeline:
    """Unified medical image and report generation with MeDiM.

    Args:
        model: the denoiser.
        vqgan: the image tokenizer; its codebook size must match the layout's image vocabulary.
        tokenizer: the text tokenizer the layout's text ids come from.
        sampler_config: the sampler settings a call uses when it does not set them (a
            `SamplerConfig` or a dict of its fields); default: the release's (`RELEASE_SAMPLER`).

    Example:
        >>> pipe = MeDiMPipeline.from_pretrained("medim-demo")
        >>> out = pipe.generate_pairs(["Frontal chest radiograph."], num_pairs_per_prompt=4)
        >>> out.images, out.reports
    """

    def __init__(
        self,
        model: MeDiMModel,
        vqgan: VQGAN,
        tokenizer: PreTrainedTokenizerBase,
        sampler_config: SamplerConfig | Mapping[str, Any] | None = None,
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
        if sampler_config is None or isinstance(sampler_config, SamplerConfig):
            self.sampler_config = sampler_config or RELEASE_SAMPLER
        else:  # a dict, e.g. model_index.json's "sampler": the release's settings under it
            self.sampler_config = RELEASE_SAMPLER.replace(**sampler_config)
        self._progress_bar_config: dict[str, Any] = {}

    @property
    def sampler_defaults(self) -> Mapping[str, Any]:
        """`sampler_config` as a read-only dict (assign `pipe.sampler_config` to change it)."""
        return MappingProxyType(self.sampler_config.to_dict())

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
        dtype, device = check_dtype_device(dtype, device)
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

    # ---- loading and saving (medim/loaders.py) -----------------------------------------------
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
        dtype, device = check_dtype_device(dtype, device)
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        parts, index = loaders.load_saved(repo_or_dir, hub, dtype, device)
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{repo_or_dir}: {loaders.MODEL_INDEX} describes a {index.get('_class_name')!r}, "
                             f"not a {cls.__name__}")
        return cls(*parts, sampler_config=SamplerConfig.from_dict(index.get("sampler") or {}))

    @classmethod
    def from_original(
        cls,
        checkpoint: str | os.PathLike | MeDiMModel = "JiaMao/medim_ckpts",
        *,
        backbone: str | os.PathLike | PretrainedConfig | None = "Junfeng5/Liquid_V1_7B",
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
        """The released MeDiM (medim-v1 layout), assembled from its upstream pieces, with the
        release's sampler settings.

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
        dtype, device = check_dtype_device(dtype, device)
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        return cls(*loaders.original_parts(checkpoint, backbone, tokenizer, vqgan, vqgan_subfolder, vqgan_repo_type,
                                           num_layers, layout, hub, dtype, device))

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
        dtype, device = check_dtype_device(dtype, device)
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        return cls(*loaders.base_model_parts(backbone, vqgan, tokenizer, num_layers, layout, vqgan_subfolder,
                                             vqgan_repo_type, text_len, image_len, image_offset, hub, dtype, device))

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

        index = {
            "_class_name": type(self).__name__,
            "_medim_version": __version__,
            "_transformers_version": transformers.__version__,
            "_torch_version": torch.__version__,
            "layout": self.layout.to_dict(),
            "sampler": self.sampler_config.to_dict(),
            "model": ["medim", type(self.model).__name__],
            "vqgan": ["medim", type(self.vqgan).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
        }
        return loaders.save_parts(save_directory, (self.model, self.vqgan, self.tokenizer), index,
                                  max_shard_size=max_shard_size, overwrite=overwrite)

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
        """Dispatch by task name: `pipe("image" | "text_to_image", ...)`, `pipe("report" |
        "image_to_report", ...)`, `pipe("pairs" | "generate_pairs", ...)`."""
        method = TASKS.get(task, task if task in TASKS.values() else None)
        if method is None:
            raise ValueError(f"task must be one of {sorted([*TASKS, *TASKS.values()])}, got {task!r}")
        return getattr(self, method)(*args, **kwargs)

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
                settings (None: the pipeline's `sampler_config`); `sampler_kwargs` sets any other
                field of `medim.diffusion.SamplerConfig` (e.g. `schedule`, `confidence_temperature`).
            generator: one generator, or one per output. Outputs do not depend on `batch_size`.
            batch_size: outputs per forward batch (None: all at once).
            output_type: "pil", "pt" (float [B, 3, H, W] in [0, 1]) or "tokens" (VQ codes).
            return_dict: False returns `(images, reports)`.
            callback_on_step_end: `fn(pipe, step, t, tokens)` after every step of every chunk.

        Example:
            >>> pipe.text_to_image(["A small lucent lesion in the left lower zone."], num_inference_steps=16).images[0]
        """
        prompts = gen.check_prompts(prompts)
        size = gen.check_image_size(image_size)
        gen.check_call(len(prompts), batch_size, output_type, generator, callback_on_step_end, sampler_kwargs)
        config = gen.sampler_settings(self.sampler_config, sampler_kwargs, num_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, strategy=strategy, temperature=temperature,
                                      top_k=top_k, top_p=top_p)
        task = tasks.text_to_image(self.layout, self.layout.encode_reports(self.tokenizer, prompts))
        condition = self.layout.condition(self.tokenizer, [size] * len(prompts))
        tokens, nfe = gen.run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        out = MeDiMOutput(gen.decode_images(self, tokens, output_type, batch_size), list(prompts), tokens, nfe)
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
            >>> pipe.image_to_report(["phantom.png"], prompt="Frontal chest radiograph.").reports
        """
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError("images is empty: pass at least one image")
        rgb = [load_image(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
        prompts = None
        if prompt is not None:
            prompts = [prompt] * len(rgb) if isinstance(prompt, str) else gen.check_prompts(prompt, "prompt")
            if len(prompts) != len(rgb):
                raise ValueError(f"prompt: give one str or one per image ({len(rgb)}), got {len(prompts)}")
        gen.check_call(len(rgb), batch_size, output_type, generator, callback_on_step_end, sampler_kwargs)
        config = gen.sampler_settings(self.sampler_config, sampler_kwargs, num_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, strategy=strategy, temperature=temperature,
                                      top_k=top_k, top_p=top_p)
        pixels, sizes = preprocess(rgb, size=self.image_resolution, return_sizes=True)
        codes = torch.cat([self.vqgan.encode(p.to(self.vqgan.device)) for p in pixels.split(batch_size or len(rgb))])
        task = tasks.image_to_report(self.layout, codes.to(self.device))
        if prompts is not None:
            given = gen.prompt_task(self.layout, self.tokenizer, prompts, self.device)
            task = tasks.TaskInputs(torch.where(given.known, given.x, task.x), given.known | task.known)
        condition = self.layout.condition(self.tokenizer, sizes)
        tokens, nfe = gen.run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        shown = {"pil": rgb, "pt": (pixels + 1) / 2, "tokens": codes}[output_type]
        out = MeDiMOutput(shown, self.layout.decode_reports(self.tokenizer, tokens), tokens, nfe)
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
            >>> out = pipe.generate_pairs(["Frontal chest radiograph."], num_pairs_per_prompt=4)
            >>> out.images[0], out.reports[0]
        """
        if isinstance(num_pairs_per_prompt, bool) or not isinstance(num_pairs_per_prompt, int) or num_pairs_per_prompt < 1:
            raise ValueError(f"num_pairs_per_prompt must be an int >= 1, got {num_pairs_per_prompt!r}")
        prompts = [p for p in gen.check_prompts(prompts, allow_empty_text=True) for _ in range(num_pairs_per_prompt)]
        size = gen.check_image_size(image_size)
        gen.check_call(len(prompts), batch_size, output_type, generator, callback_on_step_end, sampler_kwargs)
        config = gen.sampler_settings(self.sampler_config, sampler_kwargs, num_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, strategy=strategy, temperature=temperature,
                                      top_k=top_k, top_p=top_p)
        task = gen.prompt_task(self.layout, self.tokenizer, prompts, self.device)
        condition = self.layout.condition(self.tokenizer, [size] * len(prompts))
        tokens, nfe = gen.run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        out = MeDiMOutput(gen.decode_images(self, tokens, output_type, batch_size),
                          self.layout.decode_reports(self.tokenizer, tokens), tokens, nfe)
        return out if return_dict else (out.images, out.reports)

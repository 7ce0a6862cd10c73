"""MeDiMPipeline: the public API. Its parts, devices, the load / save / push entry points, and the
task methods.

A pipeline holds the three parts a MeDiM model needs: the denoiser (`MeDiMModel`), the image
tokenizer (`VQGAN`) and the text tokenizer. Where the parts come from is medim/pipelines/loading.py.
Every task is one call of the shared sampler with a different set of known positions
(medim/diffusion/tasks.py): a task method checks the user's inputs, then hands them with the parts
(`common.Runtime`) to a plain function of generation.py, editing.py or scoring.py, which turns
them into token states and token states back into images and reports.

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
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from medim.data.images import ImageInput
from medim.diffusion.config import RELEASE_SAMPLER, SamplerConfig
from medim.layout import SequenceLayout
from medim.models.denoiser import ModelDenoiser
from medim.models.medim import MeDiMModel
from medim.models.vqgan import VQGAN
from medim.pipelines import editing, generation, loading, scoring
from medim.pipelines import lora as lora_adapters
from medim.pipelines.common import (
    MAX_OUTPUTS,
    GeneratorInput,
    MeDiMOutput,
    RunSettings,
    Runtime,
    check_image_size,
    check_prompts,
    check_report_lengths,
    check_text,
    image_list,
    run_settings,
)
from medim.pipelines.editing import InfillOutput, InpaintOutput, MaskInput
from medim.pipelines.model_card import CARD_NAME, CardInfo, card_info, hub_repo_id, write_card
from medim.pipelines.scoring import DIRECTIONS, NUM_SAMPLES, ScoreOutput
from medim.utils.checks import check_bool, check_dtype_device, check_int
from medim.utils.hub import HubOptions, atomic_directory
from medim.utils.task_names import TASKS

__all__ = ["MeDiMPipeline", "MeDiMOutput"]

logger = logging.getLogger(__name__)


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
            raise ValueError(f"vqgan has {vqgan.num_codes} codes but the layout's image vocabulary has "
                             f"{image.vocab_size}")
        side = int(image.length**0.5)
        if side * side != image.length:
            raise ValueError(f"image_len={image.length} is not a square grid of codes")
        # Pixels per image side: the VQGAN turns image_size x image_size pixels into image_len codes.
        self.image_resolution = side * vqgan.downsample_factor
        self.sampler_config = sampler_config or RELEASE_SAMPLER
        self._progress_bar_config: dict[str, Any] = {}
        # The denoiser `compile()` made (None: each call samples with an eager one).
        self.compiled_denoiser: ModelDenoiser | None = None
        # The Hub repo the weights come from, for the model card's base_model (set by from_original
        # and from_base_models when they read one).
        self.base_model: str | None = None
        # The LoRA adapter injected into `model` by `load_lora_weights` (one at a time), or None.
        self.lora_adapter: lora_adapters.LoadedAdapter | None = None

    @property
    def sampler_config(self) -> SamplerConfig:
        """The sampler settings a call uses when it does not set them. Assign a SamplerConfig, or a
        dict of options (checked now, the release's settings under it), e.g.
        `pipe.sampler_config = {"num_inference_steps": 32}`."""
        return self._sampler_config

    @sampler_config.setter
    def sampler_config(self, value: SamplerConfig | Mapping[str, Any]) -> None:
        if isinstance(value, Mapping):  # e.g. model_index.json's "sampler": the release's settings under it
            value = SamplerConfig.from_dict({**RELEASE_SAMPLER.to_dict(), **value})
        if not isinstance(value, SamplerConfig):
            raise TypeError(f"sampler_config must be a SamplerConfig or a dict of its options, "
                            f"got {type(value).__name__}")
        self._sampler_config = value

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

    def compile(self, *, mode: str | None = None, backend: str = "inductor", fullgraph: bool = False) -> MeDiMPipeline:
        """Opt in to `torch.compile` of the denoiser for the fixed shapes of each task (whole
        generated segments, the batch padded to `batch_size`): two graphs per task and batch size
        (unguided, guided; a report-first pair's two phases one each), then nothing recompiles across
        steps or chunks. `mode="reduce-overhead"`
        adds CUDA graphs on CUDA. Tokens match eager up to float rounding (docs/sampling.md).
        Context-cached steps (`cache_interval`) run eager. Returns self.

        Example:
            >>> pipe = MeDiMPipeline.from_pretrained("medim-demo").compile()
        """
        self.compiled_denoiser = ModelDenoiser(self.model).compile(mode=mode, backend=backend, fullgraph=fullgraph)
        return self

    # ---- loading and saving (medim/pipelines/loading.py) ------------------------------------
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
        parts, index = loading.load_saved(repo_or_dir, hub, dtype, device)
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{repo_or_dir}: {loading.MODEL_INDEX} describes a {index.get('_class_name')!r}, "
                             f"not a {cls.__name__}")
        # The parts are always read as medim's own classes; an index naming others was not written by medim.
        for part, loaded in zip(("model", "vqgan", "tokenizer"), parts):
            named, library = index.get(part), "transformers" if part == "tokenizer" else "medim"
            if named is not None and not (isinstance(named, list) and len(named) == 2 and named[0] == library
                                          and (part == "tokenizer" or named[1] == type(loaded).__name__)):
                raise ValueError(f"{repo_or_dir}: {loading.MODEL_INDEX} \"{part}\" names {named!r}, but {part}/ is "
                                 f"read only as {library}'s {type(loaded).__name__}: the file was edited")
        try:
            sampler = SamplerConfig.from_dict(index.get("sampler") or {})
        except (TypeError, ValueError) as e:  # a tampered or hand-edited file: blame it, not the weights
            raise ValueError(f"{repo_or_dir}: {loading.MODEL_INDEX} \"sampler\": {e}") from None
        return cls(*parts, sampler_config=sampler)

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
        pipe = cls(*loading.original_parts(checkpoint, backbone=backbone, tokenizer=tokenizer, vqgan=vqgan,
                                           vqgan_subfolder=vqgan_subfolder, vqgan_repo_type=vqgan_repo_type,
                                           num_layers=num_layers, layout=layout, hub=hub, dtype=dtype, device=device))
        pipe.base_model = hub_repo_id(checkpoint)
        return pipe

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
        pipe = cls(*loading.base_model_parts(backbone, vqgan=vqgan, tokenizer=tokenizer, num_layers=num_layers,
                                             layout=layout, vqgan_subfolder=vqgan_subfolder,
                                             vqgan_repo_type=vqgan_repo_type, text_len=text_len, image_len=image_len,
                                             image_offset=image_offset, hub=hub, dtype=dtype, device=device))
        pipe.base_model = hub_repo_id(backbone)
        return pipe

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        model_card: bool | Mapping[str, Any] | CardInfo = True,
        overwrite_card: bool = False,
    ) -> Path:
        """Write model_index.json + model/ + vqgan/ + tokenizer/ (safetensors and JSON only) and a
        model card (README.md) atomically: an existing non-empty folder is replaced only with
        `overwrite=True`, and only when it is a saved pipeline holding nothing a save does not write
        (a user's file in it is never deleted); a README.md already in it is kept unless
        `overwrite_card=True`. With a LoRA adapter loaded it refuses: save the adapter with
        `save_lora_weights`, or bake it in first with `fuse_lora().unload_lora_weights()`.

        Args:
            model_card: True (a card from what the pipeline knows), False (none), or what to add to
                it: a dict of `medim.pipelines.model_card.CardInfo` fields (repo_id, base_model, license,
                datasets, training), e.g. `{"license": "mit", "training": {"steps": 2000}}`.

        Example:
            >>> pipe.save_pretrained("medim-cxr", max_shard_size="2GB", model_card={"license": "mit"})
        """
        import transformers

        from medim import __version__

        if self.lora_adapter is not None:  # peft's wrapped modules would be saved under names no load reads
            raise ValueError(
                f"save_pretrained: a LoRA adapter ({self.lora_adapter.source}) is loaded. Save it alone with "
                "pipe.save_lora_weights(dir); save the adapted model as one pipeline with "
                "pipe.fuse_lora().unload_lora_weights() first; or pipe.unload_lora_weights() to save the base")
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
        info = card_info(model_card)
        old_card = Path(save_directory).expanduser() / CARD_NAME
        keep = old_card if old_card.is_file() and not overwrite_card else None
        # One atomic write holds the parts and the card: save_parts fills this temporary folder (its
        # own atomic write renames into it), so a crash leaves the old folder, its README included.
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            loading.save_parts(tmp, (self.model, self.vqgan, self.tokenizer), index,
                               max_shard_size=max_shard_size, overwrite=True)
            if keep is not None:
                shutil.copy2(keep, tmp / CARD_NAME)
                logger.info("kept the existing %s (overwrite_card=True replaces it)", old_card)
            elif info is not None:
                write_card(self, tmp, info, repo_id=str(save_directory))
            if overwrite:
                loading.check_pipeline_replaceable(Path(save_directory).expanduser(), tmp)
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
        model_card: bool | Mapping[str, Any] | CardInfo = True,
        overwrite_card: bool = False,
    ) -> str:
        """Save into a temporary folder and upload it to `repo_id` (created if needed), with a model
        card whose usage snippet loads `repo_id` (`model_card` as for `save_pretrained`); a
        README.md already in the repo is kept unless `overwrite_card=True`. Returns the commit URL.

        Example:
            >>> pipe.push_to_hub("my-org/medim-cxr", private=True, model_card={"license": "mit"})
        """
        from huggingface_hub import HfApi

        info = card_info(model_card)
        api = HfApi(token=token)
        card = False if info is None else replace(info, repo_id=info.repo_id or repo_id)
        with tempfile.TemporaryDirectory(prefix="medim-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "pipeline", max_shard_size=max_shard_size, model_card=card)
            api.create_repo(repo_id, private=private, exist_ok=True)
            if not overwrite_card and api.file_exists(repo_id, CARD_NAME, revision=revision):
                (folder / CARD_NAME).unlink(missing_ok=True)  # upload_folder leaves the remote one as it is
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                       revision=revision)
        return str(getattr(commit, "commit_url", commit))


    # ---- what every task call runs on --------------------------------------------------------
    def _runtime(self) -> Runtime:
        """The parts of this call: the compiled denoiser when `compile()` made one for this model."""
        compiled = self.compiled_denoiser
        denoiser = compiled if compiled is not None and compiled.model is self.model else ModelDenoiser(self.model)
        return Runtime(self.model, self.vqgan, self.tokenizer, self.layout, self.image_resolution, denoiser,
                       self.sampler_config, dict(self._progress_bar_config))

    def _run_settings(self, rows: int, *, num_inference_steps: int | None, guidance_scale: float | None,
                      generator: GeneratorInput, batch_size: int | None, output_type: str,
                      callback_on_step_end: Callable[..., None] | None, sampler: SamplerConfig | None,
                      sampler_options: Mapping[str, Any], return_dict: bool) -> RunSettings:
        """The checked common options of a call making `rows` outputs; the step callback is called
        with the pipeline first."""
        check_bool(return_dict, "return_dict")
        settings = run_settings(self.sampler_config, rows, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, generator=generator, batch_size=batch_size,
                                output_type=output_type, callback=callback_on_step_end, sampler=sampler,
                                options=sampler_options)
        if callback_on_step_end is None:
            return settings
        return replace(settings, callback=partial(callback_on_step_end, self))

    # ---- generation (medim/pipelines/generation.py) ------------------------------------------
    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> MeDiMOutput | tuple:
        """Generate one image per report.

        Args:
            prompts: reports (list of str); longer than the text slots -> truncated with a warning.
            image_size: (width, height) the model is told the image has (the medim-v1 size
                condition); the output has the VQGAN's resolution.
            num_inference_steps, guidance_scale: the sampler settings set most often (None: the
                pipeline's `sampler_config`).
            generator: one generator, or one per output. Outputs do not depend on `batch_size`.
            batch_size: outputs per forward batch (None: all at once).
            output_type: "pil", "pt" (float [B, 3, H, W] in [0, 1]) or "tokens" (VQ codes).
            return_dict: False returns `(images, reports)`.
            callback_on_step_end: `fn(pipe, step, t, tokens)` after every step of every chunk.
            sampler: a `medim.diffusion.SamplerConfig` to start from instead of the pipeline's.
            **sampler_options: any other `SamplerConfig` field (`strategy`, `temperature`, `top_k`,
                `top_p`, `schedule`, `cache_interval`, ...), e.g. `**medim.diffusion.FAST_OPTIONS`.

        Example:
            >>> pipe.text_to_image(["A small lucent lesion in the left lower zone."], num_inference_steps=16).images[0]
        """
        prompts = check_prompts(prompts)
        size = check_image_size(image_size)
        settings = self._run_settings(len(prompts), num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, generator=generator, batch_size=batch_size,
                                      output_type=output_type, callback_on_step_end=callback_on_step_end,
                                      sampler=sampler, sampler_options=sampler_options,
                                      return_dict=return_dict)
        out = generation.text_to_image(self._runtime(), prompts, size, settings)
        return out if return_dict else (out.images, out.reports)

    def image_to_report(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
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
        rgb = image_list(images)
        prompts = None
        if prompt is not None:
            if isinstance(prompt, str):
                prompts = [check_text(prompt, "prompt")] * len(rgb)
            else:
                prompts = check_prompts(prompt, "prompt")
            if len(prompts) != len(rgb):
                raise ValueError(f"prompt: give one str or one per image ({len(rgb)}), got {len(prompts)}")
        settings = self._run_settings(len(rgb), num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, generator=generator, batch_size=batch_size,
                                      output_type=output_type, callback_on_step_end=callback_on_step_end,
                                      sampler=sampler, sampler_options=sampler_options,
                                      return_dict=return_dict)
        out = generation.image_to_report(self._runtime(), rgb, prompts, settings)
        return out if return_dict else (out.images, out.reports)

    def generate_pairs(
        self,
        prompts: Sequence[str],
        *,
        num_pairs_per_prompt: int = 1,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> MeDiMOutput | tuple:
        """Generate image-report pairs together; each report starts with its prompt ("" for none).

        Outputs are prompt-major: prompt 0's `num_pairs_per_prompt` pairs, then prompt 1's, ...
        A list of generators needs one per output (`len(prompts) * num_pairs_per_prompt`).
        Other arguments: as for `text_to_image`.

        Example:
            >>> out = pipe.generate_pairs(["Frontal chest radiograph."], num_pairs_per_prompt=4)
            >>> out.images[0], out.reports[0]
        """
        check_int(num_pairs_per_prompt, "num_pairs_per_prompt", minimum=1, maximum=MAX_OUTPUTS)
        prompts = [p for p in check_prompts(prompts, allow_empty_text=True) for _ in range(num_pairs_per_prompt)]
        size = check_image_size(image_size)
        settings = self._run_settings(len(prompts), num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, generator=generator, batch_size=batch_size,
                                      output_type=output_type, callback_on_step_end=callback_on_step_end,
                                      sampler=sampler, sampler_options=sampler_options,
                                      return_dict=return_dict)
        out = generation.generate_pairs(self._runtime(), prompts, size, settings)
        return out if return_dict else (out.images, out.reports)

    # ---- editing (medim/pipelines/editing.py) ------------------------------------------------
    def inpaint(
        self,
        images: ImageInput | Sequence[ImageInput],
        masks: MaskInput | Sequence[MaskInput] | torch.BoolTensor,
        prompts: str | Sequence[str] | None = None,
        *,
        mask_dilation: int = 0,
        num_candidates: int = editing.NUM_CANDIDATES,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> InpaintOutput | tuple:
        """Regenerate the masked region of each image under its report, keeping the rest.

        Args:
            images: as for `image_to_report` (padded to square, resized to the VQGAN's resolution).
            masks: one pixel mask per image, of the image's size (PIL image, path, array or
                tensor; white / True = regenerate), mapped to the code grid by "any masked pixel in
                the code's patch" (`medim.pipelines.editing`); or a bool tensor [B, image_len] of codes.
            prompts: the report each result should show (one str, or one per image), kept fixed;
                None generates the report together with the region (`out.reports`). A prompt
                longer than the model's reports (`layout.text_len` slots) is refused: cut, it
                would ask for another edit.
            mask_dilation: grow every region by this many codes in each direction.
            num_candidates: edits sampled per image; the one whose region its report explains
                best (`out.edit_scores`) is kept. Costs num_candidates x the sampling of one.
            Other arguments: as for `text_to_image` (`batch_size` counts candidate rows;
                `generator`: one, or one per image).

        Returns an `InpaintOutput` whose images are decoded from the full code grid: the codes
        outside the mask are the input's VQ codes exactly (the pixels there are the VQGAN's
        reconstruction). PIL images come back at each input's size (the square padding cut
        away, e.g. 64x32 for a 64x32 input); "pt" and "tokens" outputs are the model's square
        grid. `edit_scores` [B]: per image, in nats, how much better its report explains the
        region than the kept rest of the image; `weak_edits`: the images scoring below
        `editing.WEAK_EDIT_NATS`, whose region the context alone predicts: right for a removal,
        but where the report adds a finding, check the result (e.g. an edit past what the model
        was trained on, a third lesion on the demo).

        Example:
            >>> mask = np.zeros((64, 64), dtype=bool); mask[:32, :32] = True   # the image's upper left
            >>> out = pipe.inpaint(["phantom.png"], [mask], ["A large dense nodule in the right upper zone."])
            >>> out.images[0], out.edit_scores[0], out.weak_edits
        """
        single = not isinstance(images, (list, tuple))
        rgb = image_list(images)
        check_int(mask_dilation, "mask_dilation", minimum=0)
        check_int(num_candidates, "num_candidates", minimum=1, maximum=editing.MAX_EDIT_CANDIDATES)
        regions = editing.token_masks(masks, rgb, single, self.layout.image_len, mask_dilation)
        if prompts is not None:
            prompts = check_prompts([prompts] * len(rgb) if isinstance(prompts, str) else prompts, "prompts")
            if len(prompts) != len(rgb):
                raise ValueError(f"prompts: give one str or one per image ({len(rgb)}), got {len(prompts)}")
            check_report_lengths(self.layout, self.tokenizer, prompts, "prompts")
        settings = self._run_settings(len(rgb), num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, generator=generator, batch_size=batch_size,
                                      output_type=output_type, callback_on_step_end=callback_on_step_end,
                                      sampler=sampler, sampler_options=sampler_options,
                                      return_dict=return_dict)
        out = editing.inpaint(self._runtime(), rgb, regions, prompts, settings, num_candidates)
        return out if return_dict else (out.images, out.reports)

    def infill(
        self,
        templates: Sequence[str],
        images: ImageInput | Sequence[ImageInput] | None = None,
        *,
        exact_lengths: bool = False,
        num_samples: int = NUM_SAMPLES,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> InfillOutput | tuple:
        """Fill the gaps of report templates, given an image each or (`images=None`) unconditioned.

        Args:
            templates: reports with gaps, `[MASK]` (one token) or `[MASK:n]` (at most n tokens),
                e.g. "There is a [MASK:2] nodule in the right upper zone.". How lengths are chosen
                in each layout: `medim.pipelines.templates`. The text around the gaps is kept exactly.
            images: one per template (as for `image_to_report`), or None: the image is then
                generated together with the fills (`out.images`), like `generate_pairs`.
            exact_lengths: every gap exactly n tokens (no length choice).
            num_samples: time points of the likelihood bound that chooses gap lengths (see
                `score`; only used when a gap inside the text has more than one possible length).
            image_size: the medim-v1 size condition when `images` is None.
            Other arguments: as for `text_to_image`; `generator` is one, or one per template.

        Returns an `InfillOutput`: `reports` (the completed templates), `fills` (per template, the
        text of each gap), `images` (the inputs as in `image_to_report`, or the generated ones),
        the final states and `nfe` (sampling and length-choice forwards).

        Example:
            >>> out = pipe.infill(["There is a [MASK:2] nodule in the right upper zone."], ["phantom.png"])
            >>> out.reports[0], out.fills[0]
        """
        templates = check_prompts(templates, "templates")
        check_bool(exact_lengths, "exact_lengths")
        parsed, rows = editing.infill_rows(self.layout, self.tokenizer, templates, exact_lengths)
        rgb = None
        if images is not None:
            rgb = image_list(images)
            if len(rgb) != len(templates):
                raise ValueError(f"images: give one per template ({len(templates)}), got {len(rgb)}")
        check_int(num_samples, "num_samples", minimum=1, maximum=scoring.MAX_NUM_SAMPLES)
        settings = self._run_settings(len(templates), num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, generator=generator, batch_size=batch_size,
                                      output_type=output_type, callback_on_step_end=callback_on_step_end,
                                      sampler=sampler, sampler_options=sampler_options,
                                      return_dict=return_dict)
        out = editing.infill(self._runtime(), parsed, rows, rgb, settings, num_samples=num_samples,
                             image_size=check_image_size(image_size))
        return out if return_dict else (out.images, out.reports)

    # ---- scoring (medim/pipelines/scoring.py) ------------------------------------------------
    def score(
        self,
        images: ImageInput | Sequence[ImageInput] | None,
        reports: Sequence[str] | None,
        *,
        direction: str = "report|image",
        num_samples: int = NUM_SAMPLES,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        image_size: tuple[int, int] = (512, 512),
    ) -> ScoreOutput:
        """Score image-report pairs: `images[i]` with `reports[i]`.

        Args:
            images, reports: equally long lists (PIL images, paths, arrays or tensors; str).
            direction: "report|image" (log p(report | image): the image known, the report's
                tokens masked at each time point), "image|report", "joint" (both masked at the
                same rate), or a marginal: "report" (pass `images=None`; the image hidden) or
                "image" (pass `reports=None`).
            num_samples: time points per pair (stratified over [1e-3, 1]); one score's spread
                across seeds falls about as 1 / sqrt(num_samples) (docs/pipeline.md).
            batch_size: pair x time-point rows per model forward (default 256).
            generator: one generator; the same seed gives the same numbers, whatever the batching.
            image_size: the medim-v1 size condition when `images` is None.

        Returns a `ScoreOutput`: per pair the bound in nats (`scores`, higher = better fit), per
        token, per position, and a standard error. The pairs of one call share their draws, so
        their differences vary far less than the scores themselves.

        Example:
            >>> out = pipe.score(["phantom.png"], ["A large dense nodule in the right upper zone."],
            ...                  generator=torch.Generator().manual_seed(0))
            >>> out.scores, out.per_token
        """
        scoring.check_options(direction, num_samples, batch_size, generator, DIRECTIONS)
        uses_images, uses_reports = direction != "report", direction != "image"
        for name, value, used in (("images", images, uses_images), ("reports", reports, uses_reports)):
            if not used and value is not None:
                raise ValueError(f"direction {direction!r} leaves {name} out: pass {name}=None")
            if used and value is None:
                raise ValueError(f"direction {direction!r} needs {name}")
        reports = check_prompts(reports, "reports") if uses_reports else None
        rgb = image_list(images) if uses_images else None
        if rgb is not None and reports is not None and len(rgb) != len(reports):
            raise ValueError(f"images and reports must pair up one to one, got {len(rgb)} images and "
                             f"{len(reports)} reports")
        return scoring.score(self._runtime(), rgb, reports, direction=direction, num_samples=num_samples,
                             batch_size=batch_size, generator=generator, image_size=check_image_size(image_size))

    def rank(
        self,
        images: Sequence[ImageInput],
        reports: Sequence[str],
        *,
        direction: str = "pmi",
        estimator: str | None = None,
        num_samples: int = NUM_SAMPLES,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Score every image with every report, for retrieval: returns the float32 matrix
        [len(images), len(reports)] (higher = better fit) that ranks along both axes: the reports
        of image i by `matrix[i].argsort(descending=True)`, the images of report j by `matrix[:, j]`.

        Args:
            images, reports: lists (images as for `score`; str).
            direction: "pmi" (default): the pointwise mutual information log p(image | report) -
                log p(image), which equals log p(report | image) - log p(report), in nats; each
                report's and each image's own prior cancels, so one matrix serves both axes. Or a
                raw bound as `score` gives it ("report|image", "image|report", "joint"): these
                rank along one axis only (log p(report | image) the images of a report,
                log p(image | report) the reports of an image; docs/pipeline.md).
            estimator: how "pmi" is estimated: "one-step" (its default; the model's prediction of
                the whole image from each report, len(reports) + 1 forwards, no randomness) or
                "elbo" (the likelihood bounds, conditional minus marginal, `num_samples` shared
                time points per pair: len(images) x len(reports) x num_samples forwards). The raw
                directions take "elbo" only. `medim.pipelines.scoring` has the details.
            num_samples, batch_size, generator: as for `score` (the first and last unused by
                "one-step"). With "elbo" entry [i, j] of a raw direction equals
                `score([images[i]], [reports[j]], direction=...)` with the same generator seed,
                and of "pmi" that minus `score([images[i]], None, direction="image")`.

        Example:
            >>> matrix = pipe.rank(images, reports)
            >>> best_report, best_image = matrix.argmax(1), matrix.argmax(0)
        """
        estimator = scoring.check_rank_options(direction, estimator, num_samples, batch_size, generator)
        reports = check_prompts(reports, "reports")
        rgb = image_list(images)
        return scoring.rank(self._runtime(), rgb, reports, direction=direction, estimator=estimator,
                            num_samples=num_samples, batch_size=batch_size, generator=generator)

    def __call__(self, task: str, *args: Any, **kwargs: Any) -> MeDiMOutput | tuple:
        """Dispatch by task name: `pipe("image" | "text_to_image", ...)`, `pipe("report" |
        "image_to_report", ...)`, `pipe("pairs" | "generate_pairs", ...)`, `pipe("inpaint", ...)`, ..."""
        method = TASKS.get(task, task if task in TASKS.values() else None)
        if method is None:
            raise ValueError(f"task must be one of {sorted([*TASKS, *TASKS.values()])}, got {task!r}")
        return getattr(self, method)(*args, **kwargs)

    # ---- LoRA adapters (medim/pipelines/lora.py; docs/training.md, "LoRA fine-tuning") ----------
    def load_lora_weights(
        self,
        path_or_repo_id: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MeDiMPipeline:
        """Load a LoRA adapter (a folder or Hub repo written by `medim train` with `lora.r > 0` or
        by `save_lora_weights`) into the model; the task methods then use it. Only
        adapter_config.json and adapter_model.safetensors are read. An adapter trained on another
        base (layout, backbone shape, module names, tensor shapes) is refused, naming what differs.
        One adapter at a time. Returns self.

        Example:
            >>> pipe = MeDiMPipeline.from_pretrained("org/medim-cxr").load_lora_weights("org/medim-cxr-lora")
        """
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        self.lora_adapter = lora_adapters.load_new(self.model, self.lora_adapter, path_or_repo_id, adapter_name, hub)
        return self

    def fuse_lora(self) -> MeDiMPipeline:
        """Add the loaded adapter into the base weights: generation then costs what the base costs.
        `unfuse_lora()` takes it out again (up to float rounding). Returns self."""
        lora_adapters.set_fused(self.model, lora_adapters.loaded(self.lora_adapter), True)
        return self

    def unfuse_lora(self) -> MeDiMPipeline:
        """Undo `fuse_lora()`. Returns self."""
        lora_adapters.set_fused(self.model, lora_adapters.loaded(self.lora_adapter), False)
        return self

    def unload_lora_weights(self) -> MeDiMPipeline:
        """Remove the adapter: the base model comes back. After `fuse_lora()` the fused weights stay
        (the adapter baked in, plain modules, e.g. to `save_pretrained` a merged pipeline). Returns self."""
        lora_adapters.unload(self.model, lora_adapters.loaded(self.lora_adapter).fused)
        self.lora_adapter = None
        return self

    def save_lora_weights(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the loaded adapter as a PEFT adapter folder (adapter_config.json,
        adapter_model.safetensors, README.md model card), atomically.

        Example:
            >>> pipe.save_lora_weights("medim-cxr-lora")
        """
        adapter = lora_adapters.loaded(self.lora_adapter)
        return lora_adapters.save_adapter(save_directory, self.model, adapter.config,
                                          state=lora_adapters.adapter_state_dict(self.model, adapter.name),
                                          base_model=self.base_model or adapter.base_model, overwrite=overwrite)

    def push_lora_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                         commit_message: str = "Upload MeDiM LoRA adapter") -> str:
        """Upload the loaded adapter (as `save_lora_weights` writes it) to `repo_id`, created if
        needed. Returns the commit URL.

        Example:
            >>> pipe.push_lora_to_hub("my-org/medim-cxr-lora", private=True)
        """
        adapter = lora_adapters.loaded(self.lora_adapter)
        base = self.base_model or adapter.base_model
        return lora_adapters.push_adapter(self.model, adapter, repo_id, base_model=base, private=private, token=token,
                                          commit_message=commit_message)

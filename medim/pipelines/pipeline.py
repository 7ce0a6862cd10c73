"""MeDiMPipeline: the public API. Its parts, devices, and the load / save / push entry points.

A pipeline holds the three parts a MeDiM model needs: the denoiser (`MeDiMModel`), the image
tokenizer (`VQGAN`) and the text tokenizer. Where the parts come from is medim/pipelines/loading.py; the
tasks are medim/pipelines/generation.py (`GenerationMixin`). Every task is one call of the shared sampler
with a different set of known positions (medim/diffusion/tasks.py): the pipeline only checks user
inputs, turns them into token states and turns token states back into images and reports.

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
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from medim.diffusion.config import RELEASE_SAMPLER, SamplerConfig
from medim.layout import SequenceLayout
from medim.models.denoiser import ModelDenoiser
from medim.models.medim import MeDiMModel
from medim.models.vqgan import VQGAN
from medim.pipelines import loading
from medim.pipelines import lora as lora_adapters
from medim.pipelines.editing import EditingMixin
from medim.pipelines.generation import GenerationMixin, MeDiMOutput
from medim.pipelines.model_card import CARD_NAME, CardInfo, card_info, hub_repo_id, write_card
from medim.pipelines.scoring import ScoringMixin
from medim.utils.checks import check_dtype_device
from medim.utils.hub import HubOptions, atomic_directory
from medim.utils.task_names import TASKS

__all__ = ["MeDiMPipeline", "MeDiMOutput"]

logger = logging.getLogger(__name__)


class MeDiMPipeline(GenerationMixin, EditingMixin, ScoringMixin):
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
        # The Hub repo the weights come from, for the model card's base_model (set by from_original
        # and from_base_models when they read one).
        self.base_model: str | None = None

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
        (unguided, guided), then nothing recompiles across steps or chunks. `mode="reduce-overhead"`
        adds CUDA graphs on CUDA. Tokens match eager up to float rounding (docs/sampling.md).
        Context-cached steps (`cache_interval`) run eager. Returns self.

        Example:
            >>> pipe = MeDiMPipeline.from_pretrained("medim-demo").compile()
        """
        self._compiled_denoiser = ModelDenoiser(self.model).compile(mode=mode, backend=backend, fullgraph=fullgraph)
        return self

    # ---- loading and saving (medim/pipelines/loading.py) -----------------------------------------------
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
        pipe = cls(*loading.original_parts(checkpoint, backbone, tokenizer, vqgan, vqgan_subfolder, vqgan_repo_type,
                                           num_layers, layout, hub, dtype, device))
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
        pipe = cls(*loading.base_model_parts(backbone, vqgan, tokenizer, num_layers, layout, vqgan_subfolder,
                                             vqgan_repo_type, text_len, image_len, image_offset, hub, dtype, device))
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
        `overwrite=True`, and a README.md already in it is kept unless `overwrite_card=True`.

        Args:
            model_card: True (a card from what the pipeline knows), False (none), or what to add to
                it: a dict of `medim.pipelines.model_card.CardInfo` fields (repo_id, base_model, license,
                datasets, training), e.g. `{"license": "mit", "training": {"steps": 2000}}`.

        Example:
            >>> pipe.save_pretrained("medim-cxr", max_shard_size="2GB", model_card={"license": "mit"})
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
        with tempfile.TemporaryDirectory(prefix="medim-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "pipeline", max_shard_size=max_shard_size,
                                          model_card=False if info is None else replace(info, repo_id=info.repo_id or repo_id))
            api.create_repo(repo_id, private=private, exist_ok=True)
            if not overwrite_card and api.file_exists(repo_id, CARD_NAME, revision=revision):
                (folder / CARD_NAME).unlink(missing_ok=True)  # upload_folder leaves the remote one as it is
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
        lora_adapters.load_into(self, path_or_repo_id, adapter_name, hub)
        return self

    def fuse_lora(self) -> MeDiMPipeline:
        """Add the loaded adapter into the base weights: generation then costs what the base costs.
        `unfuse_lora()` takes it out again (up to float rounding). Returns self."""
        lora_adapters.set_fused(self, True)
        return self

    def unfuse_lora(self) -> MeDiMPipeline:
        """Undo `fuse_lora()`. Returns self."""
        lora_adapters.set_fused(self, False)
        return self

    def unload_lora_weights(self) -> MeDiMPipeline:
        """Remove the adapter: the base model comes back. After `fuse_lora()` the fused weights stay
        (the adapter baked in, plain modules, e.g. to `save_pretrained` a merged pipeline). Returns self."""
        lora_adapters.unload_from(self)
        return self

    def save_lora_weights(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the loaded adapter as a PEFT adapter folder (adapter_config.json,
        adapter_model.safetensors, README.md model card), atomically.

        Example:
            >>> pipe.save_lora_weights("medim-cxr-lora")
        """
        return lora_adapters.save_from(self, save_directory, overwrite)

    def push_lora_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                         commit_message: str = "Upload MeDiM LoRA adapter") -> str:
        """Upload the loaded adapter (as `save_lora_weights` writes it) to `repo_id`, created if
        needed. Returns the commit URL.

        Example:
            >>> pipe.push_lora_to_hub("my-org/medim-cxr-lora", private=True)
        """
        return lora_adapters.push_from(self, repo_id, private=private, token=token, commit_message=commit_message)

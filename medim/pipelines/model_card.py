"""The model card (README.md) that `save_pretrained` and `push_to_hub` write beside a pipeline: Hub
metadata through `huggingface_hub.ModelCard`, a usage snippet, the layout, the sampler defaults and
the training summary of a `medim train` run.

Example:
    >>> pipe.save_pretrained("medim-cxr", model_card={"license": "mit", "training": {"steps": 2000}})
    >>> from huggingface_hub import ModelCard
    >>> ModelCard.load("medim-cxr/README.md").data.library_name
    'medim'
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from medim import DISTRIBUTION
from medim.utils.checks import check_int

if TYPE_CHECKING:  # the pipeline imports this module to write its card
    from medim.pipelines.pipeline import MeDiMPipeline

__all__ = ["CARD_NAME", "TAGS", "PIPELINE_TAG", "CardInfo", "card_info", "hub_repo_id", "build_card", "write_card"]

CARD_NAME = "README.md"
TAGS = ("medim", "medical-imaging", "discrete-diffusion", "masked-diffusion", "text-to-image", "image-to-text")
# The Hub task of a model that maps text and images to text and images (MeDiM does all three).
PIPELINE_TAG = "any-to-any"
# Labels of the training summary keys `medim train` gives; other keys are shown by name.
TRAINING_LABELS = {
    "steps": "optimizer steps",
    "samples_seen": "training samples seen",
    "data_cache": "token cache",
    "data_size": "training examples in the cache",
    "val_size": "held-out examples",
    "loss": "final loss",
    "loss_text": "final loss, report tokens",
    "loss_image": "final loss, image tokens",
    "val_loss": "validation loss",
    # `medim distill`
    "teacher": "distilled from (teacher)",
    "method": "distillation method",
    "teacher_steps": "teacher sampler steps",
    "student_steps": "student sampler steps",
    "teacher_guidance_scale": "teacher guidance in the targets (folded in when > 0)",
    "divergence": "distillation divergence",
    "noise_scale": "shared noise the teacher wrote reports under (scale)",
    "noise_seed": "shared noise the teacher wrote reports under (seed)",
}
EXAMPLE_REPORT = "A large dense nodule in the right upper zone."


def hub_repo_id(source: Any) -> str | None:
    """`source` when it names a Hub repo (a valid repo id that is not a local path), else None:
    only such a name can be a card's `base_model`."""
    if not isinstance(source, (str, os.PathLike)) or Path(source).expanduser().exists():
        return None
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        return None
    return str(source) if "/" in str(source) else None


@dataclass(frozen=True)
class CardInfo:
    """What a model card says beyond what the pipeline itself knows.

    Attributes:
        repo_id: what the usage snippet loads (default: the repo `push_to_hub` uploads to, or the
            folder `save_pretrained` writes).
        base_model: the Hub repo the weights were trained or converted from (default: the one the
            pipeline was made from, when that is a Hub repo).
        license: a Hub licence id (default "other": the weights keep the terms of what they were
            made from; the card says which).
        datasets: Hub dataset ids the model was trained on.
        training: the summary of the run that made the weights, as `medim train` gives it: a dict
            of plain values, e.g. `{"steps": 2000, "data_cache": "mimic-cxr", "data_size": 270000,
            "loss": 2.1, "loss_text": 1.4, "loss_image": 2.6, "val_loss": 2.2}`.
    """

    repo_id: str | None = None
    base_model: str | None = None
    license: str = "other"
    datasets: tuple[str, ...] = ()
    training: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.repo_id is not None and (not isinstance(self.repo_id, str) or not self.repo_id.strip()):
            raise ValueError(f"model_card repo_id must be a non-empty str, got {self.repo_id!r}")
        if self.base_model is not None and hub_repo_id(self.base_model) is None:
            raise ValueError(f"model_card base_model must be a Hub repo id such as 'org/name', got {self.base_model!r}")
        if not isinstance(self.license, str) or not self.license.strip() or self.license != self.license.lower():
            raise ValueError(f"model_card license must be a lowercase Hub licence id such as 'mit', "
                             f"got {self.license!r}")
        datasets = (self.datasets,) if isinstance(self.datasets, str) else self.datasets
        if not isinstance(datasets, (list, tuple)) or not all(isinstance(d, str) and d for d in datasets):
            raise ValueError(f"model_card datasets must be a list of Hub dataset ids, got {self.datasets!r}")
        object.__setattr__(self, "datasets", tuple(datasets))
        if not isinstance(self.training, Mapping):
            raise TypeError(f"model_card training must be a dict, got {type(self.training).__name__}")
        for key, value in self.training.items():
            plain = value is None or isinstance(value, (str, int, float, bool))
            if not isinstance(key, str) or not plain or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"model_card training[{key!r}] must be a str, a finite number, a bool or None, "
                                 f"got {value!r}")
        if self.training.get("steps") is not None:
            check_int(self.training["steps"], "model_card training['steps']", minimum=0)
        object.__setattr__(self, "training", dict(self.training))


def card_info(model_card: Any) -> CardInfo | None:
    """`save_pretrained`'s `model_card` argument as a `CardInfo` (None: write no card)."""
    if model_card is True:
        return CardInfo()
    if model_card is False or model_card is None:
        return None
    if isinstance(model_card, CardInfo):
        return model_card
    if not isinstance(model_card, Mapping):
        raise TypeError(f"model_card must be True, False, a dict or a CardInfo, got {type(model_card).__name__}")
    unknown = sorted(set(model_card) - {f.name for f in fields(CardInfo)})
    if unknown:
        raise ValueError(f"unknown model_card keys {unknown}; accepted: {[f.name for f in fields(CardInfo)]}")
    return CardInfo(**model_card)


def _table(rows: list[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|")

    return "\n".join(["| | |", "|---|---|", *(f"| {cell(k)} | {cell(v)} |" for k, v in rows)])


def _model_rows(pipe: MeDiMPipeline) -> list[tuple[str, Any]]:
    layout, backbone = pipe.layout, pipe.model.config.backbone_config
    params = sum(p.numel() for p in pipe.model.parameters())
    side = int(layout.image_segment.length ** 0.5)
    return [
        ("layout", f"`{layout.name}`: {layout.text_segment.length} report tokens + {layout.image_segment.length} "
                   f"image codes ({side} x {side})"),
        ("denoiser", f"{getattr(backbone, 'model_type', '?')} backbone, {backbone.num_hidden_layers} layers, "
                     f"hidden size {backbone.hidden_size}, {params / 1e6:.1f} M parameters, bidirectional, AdaLN"),
        ("image tokenizer", f"VQGAN, {pipe.vqgan.num_codes} codes, {pipe.image_resolution} x "
                            f"{pipe.image_resolution} pixels"),
        ("text tokenizer", f"{type(pipe.tokenizer).__name__}, {len(pipe.tokenizer)} tokens"),
    ]


def build_card(pipe: MeDiMPipeline, info: CardInfo) -> ModelCard:
    """The card of `pipe`, `info.repo_id` in its usage snippet."""
    base_model = info.base_model or pipe.base_model
    data = ModelCardData(
        library_name="medim", license=info.license, tags=list(TAGS), pipeline_tag=PIPELINE_TAG,
        base_model=base_model, datasets=list(info.datasets) or None,
    )
    repo = info.repo_id or "path/to/this/folder"  # save_pretrained and push_to_hub always set it
    name = repo.rstrip("/").rpartition("/")[2] or repo
    parts = [
        f"# {name}",
        "A MeDiM pipeline for the `medim` library: masked discrete "
        "diffusion with a multimodal LLM backbone that generates medical images from reports, reports "
        "from images, and image-report pairs, with one model and one sampler.",
        "## Usage",
        f"Install the library with `pip install {DISTRIBUTION}` (it imports as `medim`), then:",
        "```python\nimport torch\nfrom medim import MeDiMPipeline\n\n"
        f"pipe = MeDiMPipeline.from_pretrained({json.dumps(repo)})\n"
        f"out = pipe.text_to_image([{json.dumps(EXAMPLE_REPORT)}], generator=torch.Generator().manual_seed(0))\n"
        'out.images[0].save("image.png")\n'
        "print(pipe.image_to_report(out.images).reports[0])\n"
        f"pairs = pipe.generate_pairs([\"Frontal chest radiograph.\"], num_pairs_per_prompt=2)\n```",
        f"In a browser: `medim app --model {repo}`; in batch: `medim generate --help`.",
        "## Model",
        _table(_model_rows(pipe)),
        "## Sampler defaults",
        "A call that does not set an option uses these (`pipe.sampler_config`):",
        _table([(k, v) for k, v in pipe.sampler_config.to_dict().items() if v is not None]),
    ]
    if info.training:
        command = "medim distill" if "method" in info.training else "medim train"
        parts += ["## Training", f"The run that made these weights (`{command}`):",
                  _table([(TRAINING_LABELS.get(k, k), v) for k, v in info.training.items()])]
    parts += ["## Licence",
              f"`{info.license}`. " + ("The weights keep the terms of what they were made from: a model "
                                       "trained from Liquid carries the Gemma terms, and the Chameleon VQGAN "
                                       "the Chameleon Research License (non-commercial research only). "
                                       if info.license == "other" else "")
              + "The `medim` code is MIT.",
              "Research use only: not a medical device, not for diagnosis."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


def write_card(pipe: MeDiMPipeline, folder: str | os.PathLike, info: CardInfo, repo_id: str) -> Path:
    """Write `folder/README.md` with `repo_id` in its snippet unless `info` names one. `folder` is
    the temporary folder of an atomic write (`hub.atomic_directory`), so the card lands with the
    pipeline or not at all."""
    path = Path(folder) / CARD_NAME
    build_card(pipe, replace(info, repo_id=info.repo_id or repo_id)).save(path)
    return path

"""Editing with the one model (`MeDiMPipeline.inpaint`, `infill`): image inpainting (regenerate a
masked region under a report) and report infilling (fill the gaps of a template), plus the
pixel-mask handling they need.

A pixel mask maps to the code grid by "any masked pixel in the code's patch": the mask is padded
to a square like its image (padding is not masked), and a code is regenerated when any mask pixel
inside its patch (side / grid pixels square) is set. `mask_dilation=d` then grows the region by d
codes in every direction (a square neighbourhood), giving the model room to blend the edit into its
surroundings. Every other code is kept exactly.

Inpainting samples `num_candidates` edits of each image and keeps the one whose region its report
explains best (`edit_scores`): per code of the region, log p(code | report, the kept codes) -
log p(code | the kept codes), the model's one-step prediction with the region masked (the first
sampling step's view), summed. It is the pointwise mutual information of the report and the region
given the rest of the image, so what the kept context alone predicts does not count. A low score
(below `WEAK_EDIT_NATS`, listed in `weak_edits`) says that the region is what the context alone
predicts: expected where the report removes a finding (plain tissue), a sign of failure where it
adds one, e.g. an edit asking for more than the model learned (on the demo a third lesion, where
its training phantoms hold two). docs/pipeline.md has the measurements.

Infilling starts with a few tokens of the report unknown, while the sampler's time grid starts at
t = 1, where the model expects the report wholly masked; so it runs the model's time from the
unknown fraction instead (`StartedSchedule`): a gap is what random masking at that rate looks like
(a word among visible words). Inpainting keeps t = 1: its region is one block whose content must
come from the report, not from neighbours. docs/pipeline.md has the measurements behind both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from medim.data.images import read_image_file
from medim.diffusion import tasks
from medim.diffusion.config import SamplerConfig
from medim.diffusion.schedule import NoiseSchedule, get_schedule
from medim.layout import SequenceLayout
from medim.pipelines.common import (
    MeDiMOutput,
    RunSettings,
    Runtime,
    decode_images,
    encode_images,
    row_generators,
    run_chunks,
    shown_inputs,
)
from medim.pipelines.scoring import draws, estimate_elbo, one_step, pair_rows
from medim.pipelines.templates import Candidate, Template, candidates, fill_text, parse_template

__all__ = ["InpaintOutput", "InfillOutput", "MaskInput", "NUM_CANDIDATES", "MAX_EDIT_CANDIDATES", "WEAK_EDIT_NATS",
           "StartedSchedule", "started", "load_mask", "code_mask", "token_masks", "inpaint", "edit_scores",
           "infill_rows", "infill"]

MaskInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor
NUM_CANDIDATES = 4  # inpaint's edits sampled per image (the demo: add success 0.84 -> 0.95 with one lesion present)
MAX_EDIT_CANDIDATES = 64
WEAK_EDIT_NATS = 2.0  # an edit score below this: the report explains the region < e^2 times better than the context


@dataclass
class InpaintOutput(MeDiMOutput):
    """`MeDiMOutput` of `inpaint`, plus per image `edit_scores` [B] (nats: how much better its
    report explains the regenerated region than the kept rest of the image alone; the module
    docstring) and `weak_edits`, the indices of the images whose score is below `WEAK_EDIT_NATS`:
    their region is what the context alone predicts (right for a removal; where the report adds
    a finding, check the result: the edit may ask for more than the model learned)."""

    edit_scores: torch.Tensor | None = None
    weak_edits: list[int] = field(default_factory=list)


@dataclass
class InfillOutput(MeDiMOutput):
    """`MeDiMOutput` of `infill`, plus `fills`: per template, the text each gap was filled with."""

    fills: list[list[str]] | None = None


@dataclass(frozen=True)
class StartedSchedule(NoiseSchedule):
    """`base` started at time `start` < 1: sigma(t) = base.sigma(start * t), so the sampler's grid
    from 1 to 0 feeds the model times from `start` to 0."""

    base: NoiseSchedule
    start: float

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.sigma(self.start * t)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.start * self.base.dsigma(self.start * t)


def started(config: SamplerConfig, task: tasks.TaskInputs, layout: SequenceLayout) -> SamplerConfig:
    """`config` with its noise schedule started at the task's unknown fraction: the largest share
    of a segment left unknown in any row (a segment generated whole starts at t = 1 as usual)."""
    start = max(float((~task.known[:, seg.start : seg.stop]).float().mean(1).max()) for seg in layout.segments)
    if start >= 1:
        return config
    return config.replace(noise_schedule=StartedSchedule(get_schedule(config.noise_schedule), start))


def load_mask(mask: MaskInput, name: str = "mask") -> np.ndarray:
    """A pixel mask as a bool array [H, W] (True = regenerate). PIL images and uint8 arrays: white
    (> 127) is True; bool arrays as they are; other numbers: > 0.5. Paths are read with PIL. An
    image with transparency (some pixel not fully opaque) is read by its alpha, as the app reads a
    painted layer: painted (alpha > 0) is True, whatever its colour; a fully transparent mask
    selects nothing.

    Example:
        >>> load_mask(np.eye(4, dtype=bool)).sum()
        4
    """
    if isinstance(mask, (str, os.PathLike)):
        return read_image_file(mask, lambda opened: load_mask(opened, name), kind="mask", prefix=f"{name}: ")
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in mask.info:
            alpha = np.asarray(mask.convert("RGBA"))[..., 3]
            if (alpha < 255).any():
                return alpha > 0
        return np.asarray(mask, dtype=bool) if mask.mode == "1" else np.asarray(mask.convert("L")) > 127
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        mask = (mask.float() if mask.dtype in (torch.bfloat16, torch.float16) else mask).numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a PIL image, a path, a numpy array or a tensor, got {type(mask).__name__}")
    array = mask
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):  # 1 x H x W or H x W x 1
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty H x W mask, got shape {list(mask.shape)}")
    if array.dtype == np.bool_:
        return array
    if array.dtype == np.uint8:
        return array > 127
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} has unsupported dtype {array.dtype}; accepted: bool, uint8, other numbers")
    return array > 0.5


def code_mask(mask: np.ndarray, grid: int, dilation: int = 0) -> torch.BoolTensor:
    """Map a pixel mask [H, W] to the code grid: [grid * grid] bool, row-major like the VQ codes.
    The mask is padded to a square like its image; a code is set when any pixel of its patch is."""
    h, w = mask.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2  # where preprocess pastes the image
    square = F.pad(torch.from_numpy(mask).float()[None, None], (left, side - w - left, top, side - h - top))
    return _dilate(F.adaptive_max_pool2d(square, grid) > 0, dilation).flatten()


def _dilate(codes: torch.Tensor, dilation: int) -> torch.Tensor:
    """Grow bool code masks [..., grid, grid] by `dilation` codes in every direction."""
    if not dilation:
        return codes
    grown = F.max_pool2d(codes.float().flatten(0, -3)[:, None], 2 * dilation + 1, stride=1, padding=dilation)
    return grown.view(codes.shape) > 0


def token_masks(masks: Any, rgb: list[Image.Image], single: bool, image_len: int, dilation: int) -> torch.Tensor:
    """The [B, image_len] bool masks of `inpaint`'s `masks` argument (`single`: the images were
    given as one image, not a list), checked against the images."""
    grid = int(image_len**0.5)
    if isinstance(masks, torch.Tensor) and masks.dtype == torch.bool and masks.shape == (len(rgb), image_len):
        token = _dilate(masks.cpu().view(-1, grid, grid), dilation).flatten(1)
    else:
        if single and not isinstance(masks, (list, tuple)):
            masks = [masks]
        if not isinstance(masks, (list, tuple)):
            raise TypeError(f"masks must be a list with one pixel mask per image or a bool tensor "
                            f"[{len(rgb)}, {image_len}] of codes, got {type(masks).__name__}")
        if len(masks) != len(rgb):
            raise ValueError(f"masks: give one per image ({len(rgb)}), got {len(masks)}")
        rows = []
        for i, (mask, image) in enumerate(zip(masks, rgb)):
            pixels = load_mask(mask, f"masks[{i}]")
            if pixels.shape != (image.height, image.width):
                raise ValueError(f"masks[{i}] is {pixels.shape[1]}x{pixels.shape[0]} pixels but images[{i}] is "
                                 f"{image.width}x{image.height}: a mask must have its image's size")
            rows.append(code_mask(pixels, grid, dilation))
        token = torch.stack(rows)
    empty = [i for i, row in enumerate(token) if not bool(row.any())]
    if empty:
        raise ValueError(f"masks{empty} select nothing (no white/True pixel): nothing to regenerate")
    return token


def inpaint(rt: Runtime, rgb: list[Image.Image], regions: torch.Tensor, prompts: list[str] | None,
            settings: RunSettings, num_candidates: int) -> InpaintOutput:
    """Regenerate the codes `regions` [B, image_len] of each image under its prompt (None: the
    report is generated too), keeping every other code: `num_candidates` samples per image, the
    one with the highest edit score kept."""
    _, sizes, codes = encode_images(rt, rgb)
    layout, device = rt.layout, rt.device
    text, image = layout.text_segment, layout.image_segment
    x = torch.full((len(rgb), layout.state_len), layout.mask_id, dtype=torch.long, device=device)
    x[:, image.start : image.stop] = codes + image.vocab_start
    regenerate = torch.zeros_like(x, dtype=torch.bool)
    regenerate[:, image.start : image.stop] = regions.to(device)
    if prompts is None:
        regenerate[:, text.start : text.stop] = True
    else:
        x[:, text.start : text.stop] = layout.encode_reports(rt.tokenizer, prompts).to(device)
    owner = torch.arange(len(rgb)).repeat_interleave(num_candidates)  # candidate rows, image by image
    condition = {k: v[owner] for k, v in layout.condition(rt.tokenizer, sizes).items()}
    sampling = replace(settings, generator=_candidate_generators(settings.generator, len(rgb), num_candidates, device))
    tokens, nfe = run_chunks(rt, tasks.inpainting(layout, x[owner], regenerate[owner]), condition, sampling)
    scores, spent = edit_scores(rt, tokens, regions.to(device)[owner], condition, settings.batch_size)
    best = scores.view(len(rgb), num_candidates).argmax(1) + torch.arange(len(rgb), device=device) * num_candidates
    tokens, scores = tokens[best], scores[best].cpu()
    weak = [i for i, s in enumerate(scores.tolist()) if s < WEAK_EDIT_NATS]
    reports = prompts if prompts is not None else layout.decode_reports(rt.tokenizer, tokens)
    images = decode_images(rt, tokens, settings.output_type)
    if settings.output_type == "pil":
        images = [input_size(image, size) for image, size in zip(images, sizes)]
    return InpaintOutput(images, list(reports), tokens, nfe + spent, scores, weak)


def _candidate_generators(generator: Any, count: int, num_candidates: int,
                          device: torch.device) -> Any:
    """One generator per candidate row, drawn from the image's (one candidate: the image's own,
    so a single edit samples as it always did)."""
    if num_candidates == 1:
        return generator
    seeds = [torch.randint(0, 2**62, (num_candidates,), generator=g, device=g.device).tolist()
             for g in row_generators(generator, count, device)]
    return [torch.Generator(device).manual_seed(s) for per in seeds for s in per]


def edit_scores(rt: Runtime, tokens: torch.Tensor, regions: torch.Tensor, condition: dict[str, torch.Tensor],
                batch_size: int | None) -> tuple[torch.Tensor, int]:
    """Per final state [R, N], the PMI of its report and its region `regions` [R, image_len] given
    the rest of its image (module docstring), and the forwards spent."""
    layout = rt.layout
    text, image = layout.text_segment, layout.image_segment
    codes = tokens[:, image.start : image.stop] - image.vocab_start
    seen = tokens.clone()
    seen[:, image.start : image.stop] = torch.where(regions, layout.mask_id, tokens[:, image.start : image.stop])
    hidden = seen.clone()
    hidden[:, text.start : text.stop] = layout.mask_id  # the report hidden: what the context alone predicts
    codes, regions = torch.cat([codes, codes]), torch.cat([regions, regions])
    both = {k: torch.cat([v, v]).to(rt.device) for k, v in condition.items()}
    log_p, nfe = one_step(rt, torch.cat([seen, hidden]), both, batch_size,
                          lambda lp, rows: (lp.gather(-1, codes[rows, :, None])[..., 0] * regions[rows]).sum(-1))
    return log_p[: len(tokens)] - log_p[len(tokens) :], nfe


def input_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An edited image at its input's (width, height): the square padding that preprocessing added
    cut away and the rest resized (LANCZOS). An input of the model's square size comes back as it is."""
    width, height = size
    side = max(width, height)
    scale = image.width / side
    left, top = (side - width) // 2 * scale, (side - height) // 2 * scale  # where preprocess pasted it
    return image.resize((width, height), Image.Resampling.LANCZOS,
                        box=(left, top, left + width * scale, top + height * scale))


def infill_rows(layout: SequenceLayout, tokenizer: PreTrainedTokenizerBase, templates: list[str],
                exact_lengths: bool) -> tuple[list[Template], list[Candidate]]:
    """The parsed templates and their candidate rows (one per choice of gap lengths, in template
    order); raises, before any compute, on a template that is malformed or does not fit."""
    parsed = [parse_template(t, f"templates[{i}]") for i, t in enumerate(templates)]
    rows = [c for i, t in enumerate(parsed)
            for c in candidates(layout, tokenizer, t, i, f"templates[{i}]", exact_lengths)]
    return parsed, rows


def infill(rt: Runtime, templates: list[Template], rows: list[Candidate], rgb: list[Image.Image] | None,
           settings: RunSettings, *, num_samples: int, image_size: tuple[int, int]) -> InfillOutput:
    """Fill the gaps of `templates` (their candidate `rows` from `infill_rows`), given one image
    each or (`rgb=None`) generating the images too (size condition `image_size`); where a template
    has several candidates, keep the one with the highest likelihood bound (`num_samples` time
    points)."""
    sizes, codes, pixels = [image_size] * len(templates), None, None
    if rgb is not None:
        pixels, sizes, codes = encode_images(rt, rgb)
    owner = torch.tensor([c.template for c in rows], device=rt.device)
    condition = {k: v.to(rt.device)[owner] for k, v in rt.layout.condition(rt.tokenizer, sizes).items()}
    # Per template: one seed per candidate row, then one for the length choice.
    seeds = [torch.randint(0, 2**62, (int((owner == i).sum()) + 1,), generator=g, device=g.device).tolist()
             for i, g in enumerate(row_generators(settings.generator, len(templates), rt.device))]
    task = _candidate_task(rt, rows, owner, codes)
    sampling = replace(settings, config=started(settings.config, task, rt.layout),
                       generator=[torch.Generator(rt.device).manual_seed(s) for per in seeds for s in per[:-1]])
    tokens, nfe = run_chunks(rt, task, condition, sampling)
    best, bound_nfe = _choose_lengths(rt, tokens, owner, codes, condition, seeds=[per[-1] for per in seeds],
                                      num_samples=num_samples, batch_size=settings.batch_size)
    chosen = tokens[best]
    fills = [[fill_text(rt.layout, rt.tokenizer, chosen[i], slots, gap.trailing)
              for slots, gap in zip(rows[b].gaps, templates[i].gaps)] for i, b in enumerate(best.tolist())]
    if codes is None:
        shown = decode_images(rt, chosen, settings.output_type)
    else:
        shown = shown_inputs(rgb, pixels, codes, settings.output_type)
    return InfillOutput(shown, rt.layout.decode_reports(rt.tokenizer, chosen), chosen, nfe + bound_nfe, fills)


def _candidate_task(rt: Runtime, rows: list[Candidate], owner: torch.Tensor,
                    codes: torch.Tensor | None) -> tasks.TaskInputs:
    """The candidate rows' states: template tokens known, gap slots unknown, and the image of the
    row's template known (or, without `codes`, the whole image unknown)."""
    layout = rt.layout
    text, image = layout.text_segment, layout.image_segment
    x = torch.full((len(rows), layout.state_len), layout.mask_id, dtype=torch.long, device=rt.device)
    x[:, text.start : text.stop] = torch.stack([c.ids for c in rows]).to(rt.device)
    regenerate = torch.zeros_like(x, dtype=torch.bool)
    regenerate[:, text.start : text.stop] = torch.stack([c.unknown for c in rows]).to(rt.device)
    if codes is None:
        regenerate[:, image.start : image.stop] = True
    else:
        x[:, image.start : image.stop] = codes[owner] + image.vocab_start
    return tasks.inpainting(layout, x, regenerate)


def _choose_lengths(rt: Runtime, tokens: torch.Tensor, owner: torch.Tensor, codes: torch.Tensor | None,
                    condition: dict[str, torch.Tensor], *, seeds: list[int], num_samples: int,
                    batch_size: int | None) -> tuple[torch.Tensor, int]:
    """Per template, the index of its completed row with the highest likelihood bound of the
    report (given the image when there is one; each template's draws from its seed in `seeds`),
    and the forwards spent. All lengths fill the same text slots, so their bounds compare."""
    count = len(seeds)
    best = torch.tensor([int((owner == i).nonzero()[0]) for i in range(count)], device=rt.device)
    several = [i for i in range(count) if int((owner == i).sum()) > 1]
    if not several:
        return best, 0
    text = rt.layout.text_segment
    scored = torch.cat([(owner == i).nonzero()[:, 0] for i in several])
    group = torch.cat([torch.full((int((owner == i).sum()),), g, device=rt.device) for g, i in enumerate(several)])
    direction = "report|image" if codes is not None else "report"
    x0, noised, counted = pair_rows(rt.layout, direction, tokens[scored, text.start : text.stop],
                                    codes[owner[scored]] if codes is not None else None)
    cond = {k: v[scored] for k, v in condition.items()}
    t, u = zip(*(draws(num_samples, rt.layout.state_len, torch.Generator(rt.device).manual_seed(seeds[i]), rt.device)
                 for i in several))
    bounds = estimate_elbo(rt, lambda r: (x0[r], noised[r], counted[r], {k: v[r] for k, v in cond.items()}),
                           t=torch.stack(t), u=torch.stack(u), group=group, batch_size=batch_size, keep_tokens=False,
                           desc="MeDiM infill")
    for g, i in enumerate(several):
        best[i] = scored[torch.where(group == g, bounds.scores, -torch.inf).argmax()]
    return best, bounds.nfe

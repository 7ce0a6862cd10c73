"""Editing with the one model (`EditingMixin`): image inpainting (regenerate a masked region under a
report) and report infilling (fill the gaps of a template), plus the pixel-mask handling they need.

A pixel mask maps to the code grid by "any masked pixel in the code's patch": the mask is padded
to a square like its image (padding is not masked), and a code is regenerated when any mask pixel
inside its patch (side / grid pixels square; the demo: 64 px -> 8 x 8 codes of 8 px, the release:
512 px -> 32 x 32 codes of 16 px) is set. `mask_dilation=d` then grows the region by d codes in
every direction (a square neighbourhood), giving the model room to blend the edit into its
surroundings. Every other code is kept exactly.

Infilling starts with a few tokens of the report unknown, while the sampler's time grid starts at
t = 1, where the model expects the report wholly masked; so it runs the model's time from the
unknown fraction instead (`StartedSchedule`). A gap is what random masking at that rate looks like
(a word among visible words): on the demo, one-word gaps read 0.90 of the attributes right when
filled at t = 1, all of them at t <= 0.1. Inpainting keeps t = 1: its region is one block whose
content must come from the report, not from neighbours, and starting at the region's fraction
lowered the demo's lesion-adding success from 0.92 to 0.85 (200 phantoms).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medim.data.images import ImageInput, read_image_file
from medim.diffusion import tasks
from medim.diffusion.config import SamplerConfig
from medim.diffusion.schedule import NoiseSchedule, get_schedule
from medim.pipelines.generation import (
    MeDiMOutput,
    check_call,
    check_image_size,
    check_prompts,
    decode_images,
    encode_images,
    image_list,
    row_generators,
    run_chunks,
    sampler_settings,
)
from medim.pipelines.scoring import NUM_SAMPLES, draws, estimate_elbo, pair_rows
from medim.pipelines.templates import candidates, fill_text, parse_template

__all__ = ["EditingMixin", "InfillOutput", "MaskInput", "StartedSchedule", "load_mask", "code_mask"]

MaskInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


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


def started(config: SamplerConfig, task: tasks.TaskInputs, layout: Any) -> SamplerConfig:
    """`config` with its noise schedule started at the task's unknown fraction: the largest share
    of a segment left unknown in any row (a segment generated whole starts at t = 1 as usual)."""
    start = max(float((~task.known[:, seg.start : seg.stop]).float().mean(1).max()) for seg in layout.segments)
    if start >= 1:
        return config
    return config.replace(noise_schedule=StartedSchedule(get_schedule(config.noise_schedule), start))


def load_mask(mask: MaskInput, name: str = "mask") -> np.ndarray:
    """A pixel mask as a bool array [H, W] (True = regenerate). PIL images and uint8 arrays: white
    (> 127) is True; bool arrays as they are; other numbers: > 0.5. Paths are read with PIL.

    Example:
        >>> load_mask(np.eye(4, dtype=bool)).sum()
        4
    """
    if isinstance(mask, (str, os.PathLike)):
        return read_image_file(mask, lambda opened: load_mask(opened, name), kind="mask", prefix=f"{name}: ")
    if isinstance(mask, Image.Image):
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


def _token_masks(masks: Any, rgb: list[Image.Image], single: bool, image_len: int, dilation: int) -> torch.Tensor:
    """The [B, image_len] bool masks of `inpaint`'s `masks` argument, checked against the images."""
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


def _check_dilation(mask_dilation: Any) -> None:
    if not (isinstance(mask_dilation, int) and not isinstance(mask_dilation, bool) and mask_dilation >= 0):
        raise ValueError(f"mask_dilation must be an int >= 0 (codes), got {mask_dilation!r}")


class EditingMixin:
    """Inpainting and infilling for `MeDiMPipeline` (which provides model, vqgan, tokenizer, layout,
    sampler_config, image_resolution and device)."""

    def inpaint(
        self,
        images: ImageInput | Sequence[ImageInput],
        masks: MaskInput | Sequence[MaskInput] | torch.BoolTensor,
        prompts: str | Sequence[str] | None = None,
        *,
        mask_dilation: int = 0,
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
        """Regenerate the masked region of each image under its report, keeping the rest.

        Args:
            images: as for `image_to_report` (padded to square, resized to the VQGAN's resolution).
            masks: one pixel mask per image, of the image's size (PIL image, path, array or
                tensor; white / True = regenerate), mapped to the code grid by "any masked pixel in
                the code's patch" (module docstring); or a bool tensor [B, image_len] of codes.
            prompts: the report each result should show (one str, or one per image), kept fixed;
                None generates the report together with the region (`out.reports`).
            mask_dilation: grow every region by this many codes in each direction.
            Other arguments: as for `text_to_image`.

        Returns a `MeDiMOutput` whose images are decoded from the full code grid: the codes outside
        the mask are the input's VQ codes exactly (the pixels there are the VQGAN's reconstruction).

        Example:
            >>> mask = np.zeros((64, 64), dtype=bool); mask[:32, :32] = True   # the image's upper left
            >>> out = pipe.inpaint(["phantom.png"], [mask], ["A large dense nodule in the right upper zone."])
        """
        single = not isinstance(images, (list, tuple))
        rgb = image_list(images)
        _check_dilation(mask_dilation)
        token = _token_masks(masks, rgb, single, self.layout.image_len, mask_dilation)
        if prompts is not None:
            prompts = check_prompts([prompts] * len(rgb) if isinstance(prompts, str) else prompts, "prompts")
            if len(prompts) != len(rgb):
                raise ValueError(f"prompts: give one str or one per image ({len(rgb)}), got {len(prompts)}")
        check_call(len(rgb), batch_size, output_type, generator, callback_on_step_end)
        config = sampler_settings(self.sampler_config, sampler, sampler_options,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        _, sizes, codes = encode_images(self, rgb)
        text, image = self.layout.text_segment, self.layout.image_segment
        x = torch.full((len(rgb), self.layout.state_len), self.layout.mask_id, dtype=torch.long, device=self.device)
        x[:, image.start : image.stop] = codes + image.vocab_start
        regenerate = torch.zeros_like(x, dtype=torch.bool)
        regenerate[:, image.start : image.stop] = token.to(self.device)
        if prompts is None:
            regenerate[:, text.start : text.stop] = True
        else:
            x[:, text.start : text.stop] = self.layout.encode_reports(self.tokenizer, prompts).to(self.device)
        task = tasks.inpainting(self.layout, x, regenerate)
        condition = self.layout.condition(self.tokenizer, sizes)
        tokens, nfe = run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        reports = prompts if prompts is not None else self.layout.decode_reports(self.tokenizer, tokens)
        out = MeDiMOutput(decode_images(self, tokens, output_type), list(reports), tokens, nfe)
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
        if not isinstance(exact_lengths, bool):
            raise TypeError(f"exact_lengths must be a bool, got {type(exact_lengths).__name__}")
        parsed = [parse_template(t, f"templates[{i}]") for i, t in enumerate(templates)]
        rows = [c for i, t in enumerate(parsed)
                for c in candidates(self.layout, self.tokenizer, t, i, f"templates[{i}]", exact_lengths)]
        rgb = None
        if images is not None:
            rgb = image_list(images)
            if len(rgb) != len(templates):
                raise ValueError(f"images: give one per template ({len(templates)}), got {len(rgb)}")
        if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        check_call(len(templates), batch_size, output_type, generator, callback_on_step_end)
        config = sampler_settings(self.sampler_config, sampler, sampler_options,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        sizes, codes, pixels = [check_image_size(image_size)] * len(templates), None, None
        if rgb is not None:
            pixels, sizes, codes = encode_images(self, rgb)

        owner = torch.tensor([c.template for c in rows], device=self.device)
        text, image = self.layout.text_segment, self.layout.image_segment
        x = torch.full((len(rows), self.layout.state_len), self.layout.mask_id, dtype=torch.long, device=self.device)
        x[:, text.start : text.stop] = torch.stack([c.ids for c in rows]).to(self.device)
        regenerate = torch.zeros_like(x, dtype=torch.bool)
        regenerate[:, text.start : text.stop] = torch.stack([c.unknown for c in rows]).to(self.device)
        if codes is None:
            regenerate[:, image.start : image.stop] = True
        else:
            x[:, image.start : image.stop] = codes[owner] + image.vocab_start
        task = tasks.inpainting(self.layout, x, regenerate)
        condition = {k: v.to(self.device)[owner] for k, v in self.layout.condition(self.tokenizer, sizes).items()}
        # Per template: one seed per candidate row, then one for the length choice.
        seeds = [torch.randint(0, 2**62, (int((owner == i).sum()) + 1,), generator=g, device=g.device).tolist()
                 for i, g in enumerate(row_generators(generator, len(templates), self.device))]
        row_gens = [torch.Generator(self.device).manual_seed(s) for per in seeds for s in per[:-1]]
        tokens, nfe = run_chunks(self, task, condition, started(config, task, self.layout), batch_size, row_gens,
                                 callback_on_step_end)

        best = torch.tensor([int((owner == i).nonzero()[0]) for i in range(len(templates))], device=self.device)
        several = [i for i in range(len(templates)) if int((owner == i).sum()) > 1]
        if several:  # gaps of several possible lengths: keep the completion with the highest bound
            scored = torch.cat([(owner == i).nonzero()[:, 0] for i in several])
            group = torch.cat([torch.full((int((owner == i).sum()),), g, device=self.device)
                               for g, i in enumerate(several)])
            direction = "report|image" if codes is not None else "report"
            x0, noised, counted = pair_rows(self.layout, direction, tokens[scored, text.start : text.stop],
                                            codes[owner[scored]] if codes is not None else None)
            cond = {k: v[scored] for k, v in condition.items()}
            t, u = zip(*(draws(num_samples, self.layout.state_len,
                               torch.Generator(self.device).manual_seed(seeds[i][-1]), self.device) for i in several))
            bounds = estimate_elbo(self, lambda r: (x0[r], noised[r], counted[r], {k: v[r] for k, v in cond.items()}),
                                   len(scored), torch.stack(t), torch.stack(u), group, batch_size,
                                   keep_tokens=False)
            nfe += bounds.nfe
            for g, i in enumerate(several):
                best[i] = scored[torch.where(group == g, bounds.scores, -torch.inf).argmax()]
        chosen = tokens[best]
        fills = [[fill_text(self.layout, self.tokenizer, chosen[i], slots, gap.trailing)
                  for slots, gap in zip(rows[int(b)].gaps, parsed[i].gaps)] for i, b in enumerate(best.tolist())]
        if codes is None:
            shown = decode_images(self, chosen, output_type)
        else:
            shown = {"pil": rgb, "pt": (pixels + 1) / 2, "tokens": codes}[output_type]
        out = InfillOutput(shown, self.layout.decode_reports(self.tokenizer, chosen), chosen, nfe, fills)
        return out if return_dict else (out.images, out.reports)

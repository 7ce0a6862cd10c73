"""Tasks as masks: every task is one choice of which state positions start known.

The state is `[text (layout.text_len) | image (layout.image_len)]` of backbone token ids and
`layout.segments == (text_segment, image_segment)` (docs/architecture.md). Each function returns a
`TaskInputs(x, known)`: the initial state (known tokens in place, `layout.mask_id` elsewhere) and the
`known [B, N]` mask that the sampler keeps fixed.

Example:
    >>> task = text_to_image(layout, layout.encode_reports(tokenizer, ["No acute findings."]))
    >>> out = sample(denoiser, task.x, task.known, segments=layout.segments,
    ...              mask_id=layout.mask_id, num_inference_steps=64)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medim.utils.checks import check_int, describe

from .segments import check_segments, check_tokens

__all__ = [
    "TaskInputs",
    "text_to_image",
    "image_to_report",
    "pair_from_prompt",
    "unconditional",
    "inpainting",
]


@dataclass
class TaskInputs:
    """Initial state `x [B, N]` (mask id where unknown) and the `known [B, N]` bool mask."""

    x: torch.LongTensor
    known: torch.BoolTensor


def _check_ids(ids: torch.Tensor, name: str, rows: int | None, length: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        raise ValueError(f"{name}: expected a LongTensor [batch, {length}], got {describe(ids)}")
    if ids.shape[1] != length or ids.shape[0] < 1 or (rows is not None and ids.shape[0] != rows):
        raise ValueError(f"{name}: expected shape [{rows or 'batch'}, {length}], got {list(ids.shape)}")
    return ids


def _empty(layout: Any, batch_size: int, device: torch.device | str | None) -> TaskInputs:
    check_segments(layout.segments, layout.state_len, layout.mask_id)
    x = torch.full((batch_size, layout.state_len), layout.mask_id, dtype=torch.long, device=device)
    return TaskInputs(x, torch.zeros_like(x, dtype=torch.bool))


def text_to_image(layout: Any, report_ids: torch.LongTensor) -> TaskInputs:
    """Reports known (`[B, text_len]` backbone ids, e.g. from `layout.encode_reports`), image unknown."""
    text = layout.segments[0]
    _check_ids(report_ids, "report_ids", None, layout.text_len)
    task = _empty(layout, report_ids.shape[0], report_ids.device)
    task.x[:, text.start : text.start + text.length] = report_ids
    task.known[:, text.start : text.start + text.length] = True
    check_tokens(task.x, task.known, layout.segments, "report_ids")
    return task


def image_to_report(layout: Any, image_codes: torch.LongTensor) -> TaskInputs:
    """Image known (`[B, image_len]` VQ codes in `[0, image vocab size)`), report unknown."""
    image = layout.segments[1]
    _check_ids(image_codes, "image_codes", None, layout.image_len)
    if bool(((image_codes < 0) | (image_codes >= image.vocab_size)).any()):
        raise ValueError(f"image_codes: VQ codes must lie in [0, {image.vocab_size})")
    task = _empty(layout, image_codes.shape[0], image_codes.device)
    task.x[:, image.start : image.start + image.length] = image_codes + image.vocab_start
    task.known[:, image.start : image.start + image.length] = True
    return task


def pair_from_prompt(
    layout: Any, prompt_ids: torch.LongTensor, prompt_lengths: Sequence[int] | torch.Tensor
) -> TaskInputs:
    """Image and report generated together; the first `prompt_lengths[r]` report tokens of row r are
    given (`prompt_ids [B, text_len]`, anything after the prompt is ignored)."""
    text = layout.segments[0]
    _check_ids(prompt_ids, "prompt_ids", None, layout.text_len)
    lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=prompt_ids.device)
    if lengths.shape != (prompt_ids.shape[0],) or bool(((lengths < 0) | (lengths > text.length)).any()):
        raise ValueError(
            f"prompt_lengths: expected {prompt_ids.shape[0]} integers in [0, {text.length}], got "
            f"{lengths.tolist()}"
        )
    task = _empty(layout, prompt_ids.shape[0], prompt_ids.device)
    known_text = torch.arange(text.length, device=prompt_ids.device)[None] < lengths[:, None]
    sl = slice(text.start, text.start + text.length)
    task.known[:, sl] = known_text
    task.x[:, sl] = torch.where(known_text, prompt_ids, layout.mask_id)
    check_tokens(task.x, task.known, layout.segments, "prompt_ids")
    return task


def unconditional(layout: Any, batch_size: int, device: torch.device | str | None = None) -> TaskInputs:
    """Nothing known: image and report sampled from scratch."""
    check_int(batch_size, "batch_size", minimum=1)
    return _empty(layout, batch_size, device)


def inpainting(layout: Any, x: torch.LongTensor, regenerate: torch.BoolTensor) -> TaskInputs:
    """Regenerate the positions where `regenerate [B, N]` is True (any mix of image and report
    tokens) and keep every other token of the full state `x [B, N]`."""
    _check_ids(x, "x", None, layout.state_len)
    if not isinstance(regenerate, torch.Tensor) or regenerate.dtype != torch.bool or regenerate.shape != x.shape:
        raise ValueError(f"regenerate: expected a bool tensor of shape {list(x.shape)}, got {describe(regenerate)}")
    check_segments(layout.segments, layout.state_len, layout.mask_id)
    known = ~regenerate
    check_tokens(x, known, layout.segments, "x")
    return TaskInputs(torch.where(known, x, layout.mask_id), known)

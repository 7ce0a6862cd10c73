"""Segments: one modality's slice of the diffusion state and its vocabulary range, and their checks.

The state is a row of backbone token ids, `[text | image]` in every layout. A `Segment` says where
one modality sits in it and which contiguous id range it samples from; the sampler and the loss
work per segment, so this is the lowest layer that needs it (the layouts build their segments
from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Segment", "check_segments", "check_tokens"]


@dataclass(frozen=True)
class Segment:
    """One modality's slice of the state and its contiguous vocabulary range.

    A token sampled at local index `j` of the segment is the backbone id `vocab_start + j`.

    Example:
        >>> Segment("image", start=256, length=1024, vocab_start=32004, vocab_size=8192).stop
        1280
    """

    name: str
    start: int
    length: int
    vocab_start: int
    vocab_size: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def vocab_stop(self) -> int:
        return self.vocab_start + self.vocab_size


def check_segments(segments: Sequence[Segment], state_len: int, mask_id: int) -> tuple[Segment, ...]:
    """Check that `segments` tile `[0, state_len)` in order and that no vocabulary holds `mask_id`.

    Shared by the loss, the sampler and the tasks so that every entry point rejects a bad layout
    the same way, before any compute.
    """
    segments = tuple(segments)
    if not segments:
        raise ValueError("segments: expected at least one Segment (e.g. layout.segments), got none")
    pos = 0
    for seg in segments:
        if seg.start != pos or seg.length < 1:
            raise ValueError(
                f"segments: {seg.name!r} starts at {seg.start} with length {seg.length}; segments must "
                f"tile the state in order without gaps (expected start {pos}, length >= 1)"
            )
        if seg.vocab_size < 1 or seg.vocab_start <= mask_id < seg.vocab_stop:
            raise ValueError(
                f"segments: vocabulary of {seg.name!r} is [{seg.vocab_start}, {seg.vocab_stop}); it must "
                f"be non-empty and exclude mask_id={mask_id}"
            )
        pos += seg.length
    if pos != state_len:
        raise ValueError(f"segments: cover {pos} positions but the state has {state_len}")
    if len({seg.name for seg in segments}) != len(segments):
        raise ValueError(f"segments: names must be unique, got {[seg.name for seg in segments]}")
    return segments


def check_tokens(x: torch.Tensor, where: torch.Tensor | None, segments: Sequence[Segment], name: str) -> None:
    """Raise if a token of `x` (at `where`, or everywhere) lies outside its segment's vocabulary."""
    for seg in segments:
        ids = x[:, seg.start : seg.stop]
        bad = (ids < seg.vocab_start) | (ids >= seg.vocab_stop)
        if where is not None:
            bad &= where[:, seg.start : seg.stop]
        if bool(bad.any()):
            raise ValueError(
                f"{name}: {int(bad.sum())} token(s) in the {seg.name!r} positions lie outside its "
                f"vocabulary [{seg.vocab_start}, {seg.vocab_stop})"
            )

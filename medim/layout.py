"""Where every token sits: the diffusion state, the backbone input built from it, and the read-out.

The diffusion state is always `[text (text_len) | image (image_len)]` of backbone token ids. A layout
turns that state into the sequence the backbone sees (adding specials and conditioning), says which
keys may be attended, and which backbone output position predicts each state position. Two layouts:

- "medim-v1": exactly what the released MeDiM checkpoint expects (image first, size string, shifted
  read-out, padding keys masked).
- "native": keeps the MLLM's own vocabulary (Liquid: text ids as they are, image code k -> row
  offset + k), text first after BOS, read-out at each token's own position, no key mask.

Example:
    >>> layout = SequenceLayout.from_dict({"name": "native", "text_vocab_size": 256000,
    ...     "image_offset": 256000, "image_vocab_size": 8192, "mask_id": 264192})
    >>> layout.state_len
    1280
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from medim.diffusion.segments import Segment
from medim.utils.checks import check_int, describe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Segment", "BackboneInputs", "SequenceLayout", "MeDiMV1Layout", "NativeLayout"]

logger = logging.getLogger(__name__)


@dataclass
class BackboneInputs:
    """What the backbone runs on, built by `SequenceLayout.backbone_inputs`.

    `key_mask` is True where a key may be attended, or None when nothing is padded (then no dense
    mask is built, so fused attention kernels can run). `out_index[b, n]` is the backbone output
    position whose hidden state predicts state position `n`.
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    key_mask: torch.BoolTensor | None
    out_index: torch.LongTensor


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        check_int(value, name, minimum=1)


class SequenceLayout(ABC):
    """Base class: the state layout, the vocabulary map and the backbone input/output mapping.

    Subclasses register under `name`; `SequenceLayout.from_dict(layout.to_dict())` rebuilds one.
    """

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[SequenceLayout]]] = {}

    text_len: int
    image_len: int
    mask_id: int
    pad_id: int
    report_end_id: int | None  # the state id that ends a report (None: reports run to text_len)
    supervise_padding: bool
    segments: tuple[Segment, Segment]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SequenceLayout.registry[cls.name] = cls

    @property
    def state_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def text_segment(self) -> Segment:
        return self.segments[0]

    @property
    def image_segment(self) -> Segment:
        return self.segments[1]

    @property
    def min_vocab_size(self) -> int:
        """Rows the backbone embedding table needs for every id this layout can produce."""
        return max(self.mask_id, self.image_segment.vocab_stop - 1, *self._special_ids()) + 1

    def _special_ids(self) -> tuple[int, ...]:
        return ()

    @abstractmethod
    def _params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this layout."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (stored in `MeDiMConfig.layout`); `from_dict` inverts it."""
        return {"name": self.name, **self._params()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SequenceLayout) -> SequenceLayout:
        """Build a layout from `to_dict()` output (`{"name": ..., **parameters}`)."""
        if isinstance(d, SequenceLayout):
            return d
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"layout must be a dict with a 'name' key, got {d!r}")
        params = dict(d)
        name = params.pop("name")
        if name not in cls.registry:
            raise ValueError(f"unknown layout name {name!r}; accepted: {sorted(cls.registry)}")
        return cls.registry[name](**params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceLayout) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    # ---- state checks -------------------------------------------------------------------------
    def validate_state(self, x: torch.Tensor) -> None:
        """Raise ValueError unless `x` is a LongTensor [B, state_len] of ids this layout allows:
        text positions hold text ids (or mask/pad), image positions image ids (or mask)."""
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 2:
            raise ValueError(f"x must be a LongTensor [B, {self.state_len}], got {describe(x)}")
        if x.shape[1] != self.state_len:
            raise ValueError(f"x must have {self.state_len} positions (text_len + image_len), got {x.shape[1]}")
        text, image = x[:, : self.text_len], x[:, self.text_len :]
        ts, ims = self.text_segment, self.image_segment
        ok_text = ((text >= ts.vocab_start) & (text < ts.vocab_stop)) | (text == self.mask_id) | (text == self.pad_id)
        ok_image = ((image >= ims.vocab_start) & (image < ims.vocab_stop)) | (image == self.mask_id)
        if not bool(ok_text.all()):
            raise ValueError(
                f"x text positions must hold ids in [{ts.vocab_start}, {ts.vocab_stop}) or the mask id "
                f"{self.mask_id}; found {text[~ok_text][:5].tolist()}"
            )
        if not bool(ok_image.all()):
            raise ValueError(
                f"x image positions must hold ids in [{ims.vocab_start}, {ims.vocab_stop}) or the mask id "
                f"{self.mask_id}; found {image[~ok_image][:5].tolist()}"
            )

    # ---- reports ------------------------------------------------------------------------------
    @abstractmethod
    def _report_ids(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        """One report's ids as they go into the state (before padding/truncation)."""

    def report_lengths(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
        """How many text slots each report takes in the state (specials and end mark included);
        past `text_len`, `encode_reports` would cut it."""
        return [len(self._report_ids(tokenizer, text)) for text in texts]

    def encode_reports(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.LongTensor:
        """Tokenise reports into the text part of the state, right-padded with `pad_id` to
        `text_len` (too-long reports are truncated with a warning). `texts`: a non-empty list of
        str (checked by the caller: the pipeline's input checks). The tokenizer's special-token
        strings in a text ("</s>", "<pad>") are read as plain text, never as control tokens."""
        assert texts and not isinstance(texts, str) and all(isinstance(t, str) for t in texts), texts
        out = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self._report_ids(tokenizer, text)
            if len(ids) > self.text_len:
                message = f"report {row} has {len(ids)} tokens; truncated to text_len={self.text_len}"
                warnings.warn(message, stacklevel=2)
                logger.warning(message)
                ids = self._truncate(ids)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def _truncate(self, ids: list[int]) -> list[int]:
        return ids[: self.text_len]

    def decode_reports(self, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
        """Text part of states (or full states) -> strings. Drops specials, mask and padding and
        stops at the end-of-report id."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"ids must be a LongTensor [B, text_len or state_len], got {describe(ids)}")
        if ids.shape[1] not in (self.text_len, self.state_len):
            raise ValueError(f"ids must have text_len={self.text_len} or state_len={self.state_len} columns")
        ts = self.text_segment
        reports = []
        for row in ids[:, : self.text_len].tolist():
            if self.report_end_id is not None and self.report_end_id in row:
                row = row[: row.index(self.report_end_id)]
            keep = [t for t in row if ts.vocab_start <= t < ts.vocab_stop and t != self.pad_id]
            reports.append(tokenizer.decode(keep, skip_special_tokens=True).strip())
        return reports

    # ---- backbone mapping ---------------------------------------------------------------------
    def condition(self, tokenizer: PreTrainedTokenizerBase,
                  image_sizes: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Per-row extra model inputs (none for this layout)."""
        return {}

    @abstractmethod
    def backbone_inputs(self, x: torch.LongTensor, **condition: torch.Tensor) -> BackboneInputs:
        """Build the backbone input, key mask and read-out index for states `x` [B, state_len]."""


class MeDiMV1Layout(SequenceLayout):
    """The released MeDiM checkpoint's layout (docs/formats.md, section 4).

    Vocabulary: `base_vocab_size` Llama-2 ids, then `<boi>`, `<eoi>`, `<eos>`, the mask id and the
    image codes. Backbone input per row: `[<boi>] + image + [<eoi>] + cond + text + [<eos>]`, where
    `cond` is the tokenised size string; rows whose `cond` is shorter are right-padded after `<eos>`
    with masked keys, so each row computes exactly what it would alone. `<eos>` (`eos_id`) closes
    the backbone input; it is not part of the state, and reports end nowhere (`report_end_id` None):
    the release never supervised an end of report.
    """

    name = "medim-v1"

    def __init__(
        self, *, base_vocab_size: int = 32000, text_len: int = 256, image_len: int = 1024, image_vocab_size: int = 8192
    ):
        _check_positive(
            base_vocab_size=base_vocab_size, text_len=text_len, image_len=image_len, image_vocab_size=image_vocab_size
        )
        self.base_vocab_size, self.text_len, self.image_len = base_vocab_size, text_len, image_len
        self.image_vocab_size = image_vocab_size
        self.boi_id, self.eoi_id, self.eos_id = base_vocab_size, base_vocab_size + 1, base_vocab_size + 2
        self.mask_id = base_vocab_size + 3
        self.pad_id, self.report_end_id, self.supervise_padding = 0, None, False
        self.segments = (
            Segment("text", 0, text_len, 0, base_vocab_size + 3),
            Segment("image", text_len, image_len, base_vocab_size + 4, image_vocab_size),
        )

    def _params(self) -> dict[str, Any]:
        return dict(
            base_vocab_size=self.base_vocab_size,
            text_len=self.text_len,
            image_len=self.image_len,
            image_vocab_size=self.image_vocab_size,
        )

    def _special_ids(self) -> tuple[int, ...]:
        return (self.boi_id, self.eoi_id, self.eos_id)

    def _report_ids(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        # The release tokenised reports with the tokenizer's own specials (Llama-2: BOS, no EOS).
        return list(tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])

    @staticmethod
    def size_string(width: int, height: int) -> str:
        # The odd `tensor([..])` text is what the released model saw during training.
        return f"Image Size: Width is tensor([{width}]) Height is tensor([{height}])."

    def condition(self, tokenizer: PreTrainedTokenizerBase,
                  image_sizes: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Tokenise the size string of each row: `{"cond_ids": [B, C], "cond_mask": [B, C] bool}`.
        `image_sizes`: one (width, height) pair of positive ints per row (checked by the caller)."""
        assert image_sizes and all(len(size) == 2 for size in image_sizes), image_sizes
        rows = [list(tokenizer(self.size_string(*size), add_special_tokens=True)["input_ids"]) for size in image_sizes]
        width = max(len(r) for r in rows)
        cond_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        cond_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            cond_ids[i, : len(r)] = torch.tensor(r)
            cond_mask[i, : len(r)] = True
        return {"cond_ids": cond_ids, "cond_mask": cond_mask}

    def backbone_inputs(
        self, x: torch.LongTensor, cond_ids: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None
    ) -> BackboneInputs:
        if cond_ids is None or cond_mask is None:
            raise ValueError("the medim-v1 layout needs cond_ids and cond_mask (from layout.condition(...))")
        B, T, I = x.shape[0], self.text_len, self.image_len  # noqa: E741
        if cond_ids.shape != cond_mask.shape or cond_ids.dim() != 2 or cond_ids.shape[0] != B:
            raise ValueError(
                f"cond_ids and cond_mask must both be [B={B}, C], got {tuple(cond_ids.shape)} and "
                f"{tuple(cond_mask.shape)}"
            )
        device, C = x.device, cond_ids.shape[1]
        text, image = x[:, :T], x[:, T:]
        cond_mask = cond_mask.to(device=device, dtype=torch.bool)
        cond_len = cond_mask.sum(1)
        L = I + T + 3 + C
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=device)
        ids[:, 0] = self.boi_id
        ids[:, 1 : 1 + I] = image
        ids[:, 1 + I] = self.eoi_id
        ids[:, 2 + I : 2 + I + C] = torch.where(cond_mask, cond_ids.to(device), self.pad_id)
        # The text of each row starts right after its own cond; shorter rows leave a padded tail.
        text_start = 2 + I + cond_len
        arange_t = torch.arange(T, device=device)
        text_pos = text_start[:, None] + arange_t
        ids.scatter_(1, text_pos, text)
        ids.scatter_(1, (text_start + T)[:, None], torch.full_like(text_start[:, None], self.eos_id))
        row_len = text_start + T + 1
        positions = torch.arange(L, device=device)
        key_mask = positions[None, :] < row_len[:, None]
        key_mask.scatter_(1, text_pos, text != self.pad_id)
        # Shifted read-out: image j from output 2 + j, text i from output L_row - (T + 2) + i.
        out_index = torch.cat(
            [(row_len - (T + 2))[:, None] + arange_t, (2 + torch.arange(I, device=device)).expand(B, I)], dim=1
        )
        return BackboneInputs(ids, positions.expand(B, L), key_mask, out_index)


class NativeLayout(SequenceLayout):
    """The backbone's own vocabulary: text ids unchanged, image code k -> `image_offset + k`, one
    mask row. Backbone input `[BOS] + text + image`; each state token is read at its own position.
    Reports end with `eos_id` (`report_end_id`) then `pad_id`, and both are supervised, so reports
    get a natural length.
    """

    name = "native"

    def __init__(
        self,
        *,
        text_vocab_size: int = 256000,
        image_offset: int = 256000,
        image_vocab_size: int = 8192,
        mask_id: int = 264192,
        bos_id: int = 2,
        eos_id: int = 1,
        pad_id: int = 0,
        text_len: int = 256,
        image_len: int = 1024,
    ):
        _check_positive(
            text_vocab_size=text_vocab_size, image_vocab_size=image_vocab_size, text_len=text_len, image_len=image_len
        )
        if image_offset < text_vocab_size:
            raise ValueError(f"image_offset ({image_offset}) must be >= text_vocab_size ({text_vocab_size})")
        image_stop = image_offset + image_vocab_size
        if mask_id < text_vocab_size or image_offset <= mask_id < image_stop:
            raise ValueError(f"mask_id ({mask_id}) must lie outside the text and image id ranges")
        for arg, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            check_int(value, f"{arg} (a text id)", minimum=0, maximum=text_vocab_size - 1)
        self.text_vocab_size, self.image_offset, self.image_vocab_size = text_vocab_size, image_offset, image_vocab_size
        self.mask_id, self.bos_id, self.eos_id, self.pad_id = mask_id, bos_id, eos_id, pad_id
        self.text_len, self.image_len = text_len, image_len
        self.report_end_id, self.supervise_padding = eos_id, True
        self.segments = (
            Segment("text", 0, text_len, 0, text_vocab_size),
            Segment("image", text_len, image_len, image_offset, image_vocab_size),
        )

    def _params(self) -> dict[str, Any]:
        return dict(
            text_vocab_size=self.text_vocab_size,
            image_offset=self.image_offset,
            image_vocab_size=self.image_vocab_size,
            mask_id=self.mask_id,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            text_len=self.text_len,
            image_len=self.image_len,
        )

    def _special_ids(self) -> tuple[int, ...]:
        return (self.bos_id,)

    def _report_ids(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        # BOS is added by backbone_inputs, so the report is the bare text plus its end-of-report id.
        return [*tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], self.eos_id]

    def _truncate(self, ids: list[int]) -> list[int]:
        # A truncated report still ends with eos, so the model learns where reports stop.
        return [*ids[: self.text_len - 1], self.eos_id]

    def backbone_inputs(self, x: torch.LongTensor) -> BackboneInputs:
        B, N = x.shape
        bos = torch.full((B, 1), self.bos_id, dtype=torch.long, device=x.device)
        positions = torch.arange(N + 1, device=x.device)
        # No shift: output position n + 1 holds state token n itself (BOS sits at 0).
        return BackboneInputs(torch.cat([bos, x], 1), positions.expand(B, N + 1), None, (positions[1:]).expand(B, N))

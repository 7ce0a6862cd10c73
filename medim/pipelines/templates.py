"""Report templates with gaps for infilling (`"There is a [MASK:2] nodule in the right upper zone."`):
parsing, and the text rows of the state they give (template tokens known, gap slots unknown), one
row per choice of gap lengths.

How gap lengths work. `[MASK]` is one token, `[MASK:n]` at most n tokens (count tokens, not words:
`pipe.tokenizer` shows how many a phrase takes).
- native layout (reports end with an end mark, then padding, both modelled): a gap at the end of the
  template gets n slots plus the end mark's, all unknown, so the model ends the report where it
  likes (padding as length). A gap inside the text is filled at every length 1..n and the
  completion with the highest likelihood bound is kept (`MeDiMPipeline.infill`): all lengths fill
  the same `text_len` slots, so their bounds compare.
- medim-v1 (the release never modelled where a report ends; padding is not scored): every gap is
  exactly n tokens, since bounds of reports of different lengths do not compare there.
`exact_lengths=True` makes every gap exactly n tokens in both layouts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from medim.layout import SequenceLayout

__all__ = ["GAP", "MAX_CANDIDATES", "Gap", "Template", "Candidate", "parse_template", "candidates", "fill_text"]

GAP = re.compile(r"\[MASK(?::(\d+))?\]")
# Length choices tried per template (the product of the searched gaps' ranges): each is one sampled
# row plus num_samples scoring rows.
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class Gap:
    """A gap at character `offset` of the gap-free text, of at most `size` tokens."""

    offset: int
    size: int
    trailing: bool  # nothing but whitespace after it


@dataclass(frozen=True)
class Template:
    """A template's text without its gaps (whitespace before each gap dropped) and its gaps."""

    text: str
    gaps: tuple[Gap, ...]


@dataclass
class Candidate:
    """One choice of gap lengths: the text row [text_len] (mask id in the gap slots), the unknown
    slots, and each gap's slot range (start, stop) in the row."""

    template: int
    ids: torch.LongTensor
    unknown: torch.BoolTensor
    gaps: tuple[tuple[int, int], ...]


def parse_template(template: str, name: str) -> Template:
    """Split a template into its text and gaps; raises if it has no gap, a malformed or empty one,
    or no text around its gaps."""
    text, gaps, last = "", [], 0
    for match in GAP.finditer(template):
        size = int(match.group(1) or 1)
        if size < 1:
            raise ValueError(f"{name}: {match.group(0)} holds no token; write [MASK] or [MASK:n] with n >= 1")
        text = (text + template[last : match.start()]).rstrip()  # the model writes its own separator
        gaps.append(Gap(len(text), size, not template[match.end() :].strip()))
        last = match.end()
    tail = template[last:]
    text += tail if tail.strip() else ""
    if "[MASK" in text:
        bad = text[text.index("[MASK") :].split("]")[0] + "]"
        raise ValueError(f"{name}: {bad!r} is not a gap; write [MASK] (one token) or [MASK:n] (at most n tokens)")
    if not gaps:
        raise ValueError(f"{name} has no gap: mark each gap as [MASK] (one token) or [MASK:n] (at most n tokens)")
    if not text.strip():
        raise ValueError(f"{name} holds only gaps: give some text around them (or use image_to_report / "
                         "generate_pairs to write whole reports)")
    return Template(text, tuple(gaps))


def candidates(layout: SequenceLayout, tokenizer: PreTrainedTokenizerBase, template: Template, index: int, name: str,
               exact: bool) -> list[Candidate]:
    """The rows of one template, one per searched choice of gap lengths (see the module docstring).
    Raises, before any compute, when the template does not fit the text slots or a gap splits a token."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("report templates need a fast (Rust) tokenizer: gaps are placed by its character offsets")
    plain = tokenizer(template.text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    ids, offsets = plain["input_ids"], plain["offset_mapping"]
    if len(ids) + sum(g.size for g in template.gaps) > layout.text_len:
        raise ValueError(f"{name} needs {len(ids)} text + {sum(g.size for g in template.gaps)} gap tokens, more "
                         f"than the model's reports hold (text_len={layout.text_len})")
    row = layout.encode_reports(tokenizer, [template.text])[0].tolist()
    start = next((s for s in range(len(row) - len(ids) + 1) if row[s : s + len(ids)] == ids), None)
    if start is None:
        raise ValueError(f"{name}: the layout's encoding of the text does not contain its plain tokens")
    length = max(i + 1 for i, v in enumerate(row) if v != layout.pad_id)  # the encoded text, specials included
    if length + sum(g.size for g in template.gaps) > layout.text_len:
        raise ValueError(f"{name} needs {length} text + {sum(g.size for g in template.gaps)} gap token slots, "
                         f"more than the model's reports hold (text_len={layout.text_len})")
    cuts = []
    for gap in template.gaps:
        if any(a < gap.offset < b for a, b in offsets):
            raise ValueError(f"{name}: a gap at character {gap.offset} of {template.text!r} falls inside a token; "
                             "put a space or punctuation next to gaps")
        cuts.append(start + sum(a < gap.offset for a, _ in offsets))
    ends_itself = layout.report_end_id is not None
    searched = [ends_itself and not exact and not g.trailing for g in template.gaps]
    choices = [range(1, g.size + 1) if s else (g.size,) for g, s in zip(template.gaps, searched)]
    total = 1
    for c in choices:
        total *= len(c)
    if total > MAX_CANDIDATES:
        raise ValueError(f"{name}: its gaps allow {total} length combinations, more than {MAX_CANDIDATES}; "
                         "use smaller gaps or exact_lengths=True")
    out = []
    for sizes in itertools.product(*choices):
        ids_out, unknown, slots, prev = [], [], [], 0
        for cut, size, gap in zip(cuts, sizes, template.gaps):
            ids_out += row[prev:cut]
            unknown += [False] * (cut - prev)
            slots.append((len(ids_out), len(ids_out) + size))
            # A trailing gap in a layout with an end mark also leaves the end mark's slot open.
            extra = int(ends_itself and gap.trailing and not exact)
            ids_out += [layout.mask_id] * (size + extra)
            unknown += [True] * (size + extra)
            prev = cut + extra
        ids_out += row[prev:length]
        unknown += [False] * (length - prev)
        pad = layout.text_len - len(ids_out)
        out.append(Candidate(index, torch.tensor(ids_out + [layout.pad_id] * pad),
                             torch.tensor(unknown + [False] * pad), tuple(slots)))
    return out


def fill_text(layout: SequenceLayout, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, slots: tuple[int, int],
              trailing: bool) -> str:
    """The text a gap was filled with (a trailing gap may end early at the end mark)."""
    start, stop = slots
    tokens = ids[start : stop + int(trailing and layout.report_end_id is not None)].tolist()
    if layout.report_end_id is not None and layout.report_end_id in tokens:
        tokens = tokens[: tokens.index(layout.report_end_id)]
    text = layout.text_segment
    keep = [t for t in tokens if text.vocab_start <= t < text.vocab_stop and t != layout.pad_id]
    return tokenizer.decode(keep, skip_special_tokens=True).strip()

"""Context caching for the sampling loop: keys/values of the backbone positions that do not change
between refreshes are kept, and a cached step runs only the positions that can change or are read.

A refresh is the plain forward of the whole backbone sequence; every layer's attention module hands
its keys and values (after the rotary embedding, exactly as it computed them) to a `KVStore`,
through the cache protocol of transformers' attention modules (`cache.update(k, v, layer_idx)`).
Per row, only the served state positions that are masked at the refresh can change until the next
one; a cached step embeds just the backbone positions holding them and those their outputs are read
from (the row's active positions), and runs them through the same modules (projections, rotary
embedding, SDPA, MLP, norms, AdaLN at the step's sigma). Each attention writes the fresh keys/values
of the active positions into the store and attends over the whole sequence's. The other positions'
keys/values are as old as the refresh: computed at its sigma and in its context. That staleness is
the approximation; a refresh every step gives the uncached result.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVStore", "ContextCache", "refresh", "cached_step", "cache_argument"]


def cache_argument(attention: torch.nn.Module) -> str:
    """The name under which `attention.forward` takes a cache: `cache` (transformers 5.x) or
    `past_key_values` (4.57)."""
    return "cache" if "cache" in inspect.signature(attention.forward).parameters else "past_key_values"


class KVStore:
    """Every layer's keys/values [R, kv_heads, L, head_dim] of one batch of R rows, filled by a
    refresh. Once `active` [R, K] is set, an update writes the K fresh keys/values of a cached step
    at those positions (in place: they are recomputed at every cached step, never read stale) and
    returns the whole sequence's."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.active: torch.LongTensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.active is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self.active[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values


@dataclass
class ContextCache:
    """What a refresh leaves for the cached steps after it.

    Attributes:
        store: the keys/values.
        positions: the state positions served, `{segment: LongTensor [K_s]}`.
        active: [R, K] backbone positions a cached step runs (per row: the same count).
        read: [R, N] per state position, the index into `active` of its read-out position, or K
            (a zero row) where the row's token was not masked at the refresh.
    """

    store: KVStore
    positions: dict[str, torch.Tensor]
    active: torch.LongTensor
    read: torch.LongTensor


def _input_positions(layout: Any, x: torch.Tensor, input_ids: torch.Tensor, positions: dict[str, torch.Tensor],
                     changing: torch.Tensor, condition: dict[str, torch.Tensor]) -> torch.Tensor:
    """[R, L] bool: the backbone positions holding the tokens at `positions` (in segment order) that
    `changing` [R, S] marks, `input_ids` being the backbone inputs of `x`. A layout copies each state
    token to one backbone position, wherever its specials and condition go, so these are where the
    inputs of `x` and of `x` with those tokens replaced differ."""
    moved, offset = x.clone(), 0
    for seg in layout.segments:
        if seg.name in positions:
            pos = positions[seg.name]
            rows = changing[:, offset : offset + pos.numel()]
            moved[:, pos] = torch.where(rows, seg.vocab_start, x[:, pos])  # any other token of the segment
            offset += pos.numel()
    return input_ids != layout.backbone_inputs(moved, **condition).input_ids


def refresh(model: Any, x: torch.Tensor, sigma: torch.Tensor, positions: dict[str, torch.Tensor],
            return_logits: bool, condition: dict[str, torch.Tensor]) -> tuple[Any, ContextCache]:
    """A whole forward of `model` (a MeDiMModel) that keeps every layer's keys/values; returns its
    output at `positions` and the cache that serves them."""
    if not positions:
        raise ValueError("positions: a context cache serves given state positions, e.g. {'image': ...}; got none")
    if model.config.causal:
        raise ValueError("context caching needs bidirectional attention (the model's config.causal is True)")
    layout, store = model.layout, KVStore()
    inputs = layout.backbone_inputs(x, **condition)
    hidden = model.backbone_hidden_states(inputs.input_ids, sigma, inputs.position_ids, inputs.key_mask, cache=store)
    out = model.read_out(hidden, inputs.out_index, positions, return_logits)
    positions = {seg.name: positions[seg.name].to(x.device) for seg in layout.segments if seg.name in positions}
    served = torch.cat(list(positions.values()))
    changing = x[:, served] == layout.mask_id  # [R, S]: per row, what may change until the next refresh
    wanted = _input_positions(layout, x, inputs.input_ids, positions, changing, condition)
    reads = inputs.out_index[:, served]
    wanted |= torch.zeros_like(wanted).scatter_(1, reads, changing)
    # Rows may want different counts: the shorter ones run a few extra positions, which costs a
    # little and changes nothing (a recomputed position is exact).
    count = int(wanted.sum(1).max())
    active = (~wanted).to(torch.uint8).argsort(dim=1, stable=True)[:, :count]
    slot = torch.full_like(inputs.input_ids, count)  # `count`: a zero row appended to the hidden states
    slot.scatter_(1, active, torch.arange(count, device=x.device).expand_as(active))
    read = torch.full_like(inputs.out_index, count)
    read[:, served] = torch.where(changing, slot.gather(1, reads), count)
    store.active = active
    return out, ContextCache(store, positions, active, read)


def cached_step(model: Any, cache: ContextCache, x: torch.Tensor, sigma: torch.Tensor,
                positions: dict[str, torch.Tensor], return_logits: bool, *, condition: dict[str, torch.Tensor]) -> Any:
    """The output of `model` at the cache's positions, running only its active backbone positions.
    Where a row's token was not masked at the refresh, the output is zero logits (it cannot change,
    so a sampler has no use for it)."""
    if x.shape[0] != cache.active.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but the cache was made for {cache.active.shape[0]}")
    if positions.keys() != cache.positions.keys() or any(
            p.shape != cache.positions[k].shape for k, p in positions.items()):
        raise ValueError("positions differ from those the cache was made for: refresh (cache=None) first")
    inputs = model.layout.backbone_inputs(x, **condition)
    # The key mask is the current one: a report slot committed to padding stops being attended.
    hidden = model.backbone_hidden_states(inputs.input_ids.gather(1, cache.active), sigma,
                                          inputs.position_ids.gather(1, cache.active), inputs.key_mask,
                                          cache=cache.store)
    hidden = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])], 1)
    return model.read_out(hidden, cache.read, cache.positions, return_logits)

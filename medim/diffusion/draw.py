"""Per-position sampling maths of the sampler: temperature / top-k / top-p filtering, the blocked
inverse-CDF categorical draw, and ranks within a row."""

from __future__ import annotations

import math

import torch

__all__ = ["filter_logprobs", "categorical", "ranks"]


def filter_logprobs(logp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """Temperature, top-k and top-p on float32 log-probs; returns re-normalised log-probs."""
    if temperature == 1.0 and top_k is None and top_p is None:
        return logp
    if temperature != 1.0:
        logp = logp / temperature
    if top_k is not None and top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_lp.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the best token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(drop, -math.inf))
    return logp.log_softmax(-1)


def categorical(weights: torch.Tensor, u: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sample from non-negative, unnormalised `weights` [..., V] with one uniform per
    row u [...] (one random number per position instead of V, so per-row generators stay cheap).
    Returns the index and the row totals. Two levels (block sums, then one block's entries), so
    no [..., V] cumulative sum is ever allocated: on CPU that allocation cost more than the maths."""
    V = weights.shape[-1]
    full = V - V % block
    sums = weights[..., :full].unflatten(-1, (full // block, block)).sum(-1)
    if full < V:
        sums = torch.cat([sums, weights[..., full:].sum(-1, keepdim=True)], -1)
    cum = sums.cumsum(-1)
    total = cum[..., -1]
    target = (u * total).unsqueeze(-1)
    blk = torch.searchsorted(cum, target, right=True).clamp(max=cum.shape[-1] - 1)
    before = torch.where(blk > 0, cum.gather(-1, (blk - 1).clamp(min=0)), 0.0)
    cols = blk * block + torch.arange(block, device=weights.device)
    if full < V:  # a ragged last block: read its missing columns as zeros
        inside = weights.gather(-1, cols.clamp(max=V - 1)).masked_fill(cols >= V, 0.0).cumsum(-1)
    else:  # every block is whole (8192 image codes): two [..., block] passes fewer
        inside = weights.gather(-1, cols).cumsum(-1)
    j = torch.searchsorted(inside, (target - before).contiguous(), right=True).clamp(max=block - 1)
    return (blk * block + j).squeeze(-1).clamp(max=V - 1), total


def ranks(conf: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = highest; ties broken by position (stable sort)."""
    order = conf.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)

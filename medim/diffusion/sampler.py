"""The one sampling loop: every task, every strategy, classifier-free guidance.

What the release does (UCSC-VLAA/MeDiM, model_eval_inf.py `_sample`, `adap_sche`,
`_maskgit_update`, `_ddpm_forward`, `get_cfg_weight`) and where medim matches it:
- Time grid t_i = linspace(1, 1e-5, steps + 1)[i] for step i; the model gets sigma(t_i) of the
  log-linear schedule. medim: same (`time_eps=1e-5`, `noise_schedule="loglinear"`).
- Commit counts ("arccos"): r = linspace(1, 0, steps), f = arccos(r) / (pi / 2), per row
  round(f / sum(f) * num_masked), zeros raised to 1, the last step takes the remainder (at
  least 0), and each step commits min(count, still masked). medim: `commit_counts`, identical,
  computed on the host before the loop. The release also shrinks `steps` for the whole batch to
  the smallest row's number of masked tokens; medim instead lets such a row commit one token per
  step until it is done, so a row's result does not depend on its batch. A step where no row
  commits anything runs no forward, as in the release.
- Guidance: w = cfg * (1 - t) ("linear"); when w > 0 and something is known, one batched forward
  of [x, x with the known positions set to the mask id], mixed (1 + w) * cond - w * uncond, then
  re-normalised (the release re-applies its log-softmax). medim: same, on log-probs (identical
  after re-normalisation). At t = 1 the ramp gives w = 0 and the step is unguided, as in the release.
- MaskGIT update: sample each masked token from p, confidence = log p(sample) + r_temp * t *
  Gumbel (r_temp 10), commit the k highest-confidence masked tokens. medim: same in float32, with
  ties broken by position instead of committing every tied token.
- Final pass: argmax of an unguided forward at t = 1e-5 for anything still masked. medim: same;
  with maskgit and threshold the counts already commit everything, so it only runs for ddpm.
- Not copied: without guidance the release exponentiates raw logits (unnormalised confidences);
  medim always works with normalised log-probs. Random numbers come from torch generators, not
  numpy's global state.

Random numbers: each step draws one uniform tensor [B, 2, N] (N = state length; one [2, N] draw
per row when `generator` is a list): plane 0 drives the categorical sample (inverse CDF), plane 1
the Gumbel confidence (maskgit) or the unmasking coin (ddpm). The shape does not depend on the
batch, so with one generator per row, row r's tokens are the same alone or inside any batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import COMMIT_SCHEDULES, GUIDANCE_SCHEDULES, STRATEGIES, SamplerConfig
from .schedule import get_schedule
from .segments import Segment, check_segments, check_tokens

__all__ = ["SampleOutput", "sample", "commit_counts", "STRATEGIES", "COMMIT_SCHEDULES", "GUIDANCE_SCHEDULES"]

logger = logging.getLogger(__name__)


@dataclass
class SampleOutput:
    """tokens: the final state [B, N] (no mask id left). nfe: network evaluations (a guided step's
    batched conditional + unconditional forward counts as one)."""

    tokens: torch.LongTensor
    nfe: int


def commit_counts(
    num_unknown: Sequence[int] | torch.Tensor, num_steps: int, schedule: str = "arccos"
) -> torch.LongTensor:
    """How many tokens each row commits at each step, `[B, num_steps]` (the release's `adap_sche`
    followed by its per-step cap): at least one per step while a row has unknowns, all of them by
    the last step.

    Example:
        >>> commit_counts([10], 4).tolist()
        [[1, 2, 3, 4]]
    """
    if schedule not in COMMIT_SCHEDULES:
        raise ValueError(f"schedule: unknown commit schedule {schedule!r}; accepted: {list(COMMIT_SCHEDULES)}")
    m = torch.as_tensor(num_unknown, dtype=torch.long).reshape(-1, 1)
    if num_steps == 1:
        return m.clone()
    r = torch.linspace(1, 0, num_steps)
    frac = {
        "arccos": lambda: torch.arccos(r) / (math.pi * 0.5),
        "cosine": lambda: torch.cos(r * math.pi * 0.5),
        "linear": lambda: 1 - r,
    }[schedule]()
    counts = ((frac / frac.sum()) * m).round()
    counts[counts == 0] = 1
    counts[:, -1] += m[:, 0] - counts.sum(-1)
    counts[:, -1].clamp_(min=0)
    done = counts.long().cumsum(-1).clamp(max=m)  # committed after each step, capped at num_unknown
    return torch.diff(done, dim=-1, prepend=torch.zeros_like(m))


def _filter_logprobs(logp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
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


def _categorical(weights: torch.Tensor, u: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
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


def _ranks(conf: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = highest; ties broken by position (stable sort)."""
    order = conf.argsort(dim=-1, descending=True, stable=True)
    ar = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def _uniforms(generator, B: int, N: int, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(B, 2, N, device=device)
    if isinstance(generator, torch.Generator):
        return torch.rand(B, 2, N, generator=generator, device=generator.device).to(device)
    # One small draw per row: the price of results that do not depend on the batch.
    return torch.stack([torch.rand(2, N, generator=g, device=g.device).to(device) for g in generator])


def _check_inputs(x, known, segments, mask_id, generator, model_kwargs) -> tuple[Segment, ...]:
    """The tensors of one call (the settings were checked when their SamplerConfig was made)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected a LongTensor [batch, state_len], got {type(x).__name__}")
    if not isinstance(known, torch.Tensor) or known.dtype != torch.bool or known.shape != x.shape:
        raise ValueError(f"known: expected a bool tensor of shape {list(x.shape)}")
    segments = check_segments(segments, x.shape[1], mask_id)
    check_tokens(x, known, segments, "x (known positions)")
    check_generator(generator, x.shape[0])
    for name, value in model_kwargs.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != x.shape[0]):
            raise ValueError(f"model_kwargs[{name!r}]: tensors must be per row, first dim {x.shape[0]}")
    return segments


def check_generator(generator: Any, rows: int | None = None) -> None:
    """`generator` must be None, a torch.Generator, or a list with one per row (`rows`, if known)."""
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError(f"generator: a list must hold only torch.Generators, got {generator!r}")
        if rows is not None and len(generator) != rows:
            raise ValueError(f"generator: a list needs one generator per output ({rows}), got {len(generator)}")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None, a torch.Generator or a list of them (one per output), "
                        f"got {generator!r}")


@torch.no_grad()
def sample(
    denoiser: Callable[..., Mapping[str, torch.Tensor]],
    x: torch.LongTensor,
    known: torch.BoolTensor,
    *,
    segments: Sequence[Segment],
    mask_id: int,
    config: SamplerConfig | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    progress: bool = False,
    **options: Any,
) -> SampleOutput:
    """Fill every unknown position of `x` by iterative unmasking.

    Args:
        denoiser: `denoiser(x, sigma, positions, **model_kwargs) -> {segment: log-probs [B, K, V]}`
            (docs/architecture.md). It is only asked for positions unknown in some row, and never
            for a segment that is fully known (text-to-image computes no text logits). The tensors
            it returns belong to the sampler, which overwrites them (no per-step copies). Raw
            logits work as well and save the model a log-softmax pass (`model(..., return_logits=True)`):
            the sampler only uses its input up to a per-position additive constant (the guidance
            mix (1 + w) a - w b keeps a constant a constant, then softmax, log-softmax or argmax).
        x, known: the state `[B, N]` and the bool mask of given positions (see `medim.diffusion.tasks`);
            unknown positions may hold anything, known ones never change.
        segments, mask_id: `layout.segments`, `layout.mask_id`.
        config: the settings (`SamplerConfig`: steps, strategy, guidance, temperature, ...);
            default `SamplerConfig()`.
        generator: None, one torch.Generator, or one per row (row results independent of batching).
        model_kwargs: extra per-row model inputs (tensors with first dim B, repeated for guidance).
        callback: `callback(step, t, x)` after every step.
        progress: show a tqdm bar.
        **options: any `SamplerConfig` field, applied over `config` (e.g. `num_steps=64`).

    Example:
        >>> task = text_to_image(layout, report_ids)
        >>> out = sample(denoiser, task.x, task.known, segments=layout.segments,
        ...              mask_id=layout.mask_id, num_steps=64, guidance_scale=5.0,
        ...              generator=torch.Generator().manual_seed(0))
        >>> out.tokens.shape, out.nfe
    """
    config = (config or SamplerConfig()).replace(**options)
    model_kwargs = dict(model_kwargs or {})
    segments = _check_inputs(x, known, segments, mask_id, generator, model_kwargs)
    return _denoise(denoiser, x, known, segments, mask_id, config, generator, model_kwargs, callback, progress)


def _denoise(denoiser, x, known, segments, mask_id, c: SamplerConfig, generator, model_kwargs, callback, progress):
    """The loop itself, on checked inputs (`c`: the settings)."""
    noise = get_schedule(c.noise_schedule)
    B, N = x.shape
    device = x.device
    x = torch.where(known, x, mask_id)

    # Everything static is decided here, on the host, once: which positions to ask for, how many
    # tokens each row commits per step, the time grid and the guidance weight of each step.
    unknown_any = (~known).any(0)
    requested = []  # (segment, state positions [K_s], offset into the concatenated K)
    offset = 0
    for seg in segments:
        pos = torch.nonzero(unknown_any[seg.start : seg.start + seg.length]).squeeze(-1) + seg.start
        if pos.numel():
            requested.append((seg, pos, offset))
            offset += pos.numel()
    if not requested:
        return SampleOutput(tokens=x, nfe=0)
    positions = {seg.name: pos for seg, pos, _ in requested}
    pos_all = torch.cat([pos for _, pos, _ in requested])
    vocab_start = torch.cat([torch.full((p.numel(),), s.vocab_start, device=device) for s, p, _ in requested])

    num_steps = c.num_steps
    num_unknown = (~known).sum(-1).cpu()
    counts = commit_counts(num_unknown, num_steps, c.schedule)
    active = (counts.sum(0) > 0).tolist() if c.strategy == "maskgit" else [True] * num_steps
    counts = counts.to(device)
    t_grid = torch.linspace(1, c.time_eps, num_steps + 1, dtype=torch.float32)
    sigma_grid = noise.sigma(t_grid).to(device)
    move = noise.move_chance(t_grid).tolist()
    t_list = t_grid.tolist()
    any_known = bool(known.any())
    ramp = [c.guidance_scale * (1 - t) if c.guidance_schedule == "linear" else c.guidance_scale for t in t_list]
    guided = [any_known and w > 0 for w in ramp]
    # The guided forward runs [conditional; unconditional] as one batch: per-row inputs twice.
    guided_kwargs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}

    def logprobs(i: int, w: float, use_guidance: bool) -> torch.Tensor:
        """Per requested segment, float32 (guided) log-weights [B, K_s, V_s]: log-probs up to a
        per-position constant (raw logits in, or the unnormalised guidance mix)."""
        sigma = sigma_grid[i].expand(B)
        if use_guidance:
            xu = torch.where(known, mask_id, x)  # the condition hidden, everything else as is
            out = denoiser(torch.cat([x, xu]), torch.cat([sigma, sigma]), positions, **guided_kwargs)
        else:
            out = denoiser(x, sigma, positions, **model_kwargs)
        parts = []
        for seg, pos, _ in requested:
            lp = out[seg.name]
            rows = 2 * B if use_guidance else B
            if lp.shape != (rows, pos.numel(), seg.vocab_size):
                raise ValueError(
                    f"denoiser: expected log-probs or logits {[rows, pos.numel(), seg.vocab_size]} for segment "
                    f"{seg.name!r}, got {list(lp.shape)}"
                )
            lp = lp.float()
            if use_guidance:
                # (1 + w) cond - w uncond, written over the unconditional half (no new [B, K, V]
                # tensor); left unnormalised: `draw` normalises it on the way.
                cond, uncond = lp.chunk(2)
                lp = uncond.lerp_(cond, 1 + w)
            parts.append(lp)
        return parts

    temperature, top_k, top_p = c.temperature, c.top_k, c.top_p
    plain = temperature == 1.0 and top_k is None and top_p is None

    def draw(parts, u):
        """Sample every requested position: returns candidate ids and their log-probs [B, K].
        `parts` hold unnormalised log-weights and are overwritten."""
        ids, lps = [], []
        for (_, _, off), z in zip(requested, parts):
            if plain:
                # Probabilities in place (one fused pass over each row, no new [B, K, V] tensor);
                # log p(sample) is read back from them.
                probs = torch.softmax(z, -1, out=z)
                idx, total = _categorical(probs, u[:, off : off + z.shape[1]])
                lps.append(probs.gather(-1, idx[..., None]).squeeze(-1).log() - total.log())
            else:
                lp = z.log_softmax(-1)
                if temperature == 0:
                    idx = lp.argmax(-1)
                else:
                    lp = _filter_logprobs(lp, temperature, top_k, top_p)
                    idx = _categorical(lp.exp(), u[:, off : off + lp.shape[1]])[0]
                lps.append(lp.gather(-1, idx[..., None]).squeeze(-1))
            ids.append(idx)
        return torch.cat(ids, -1) + vocab_start, torch.cat(lps, -1)

    nfe = 0
    steps = tqdm(range(num_steps), desc="Sampling", disable=not progress)
    for i in steps:
        t = t_list[i]
        u = _uniforms(generator, B, N, device)[:, :, pos_all]  # drawn every step: streams stay aligned
        if active[i]:
            parts = logprobs(i, ramp[i], guided[i])
            nfe += 1
            cand, lp = draw(parts, u[:, 0])
            xs = x[:, pos_all]
            masked = xs == mask_id
            if c.strategy == "maskgit":
                gumbel = -torch.log(-torch.log(u[:, 1].clamp(1e-20, 1 - 1e-7)))
                conf = torch.where(masked, lp + (c.confidence_temperature * t) * gumbel, -math.inf)
                commit = masked & (_ranks(conf) < counts[:, i : i + 1])
            elif c.strategy == "threshold":
                if i == num_steps - 1:
                    commit = masked
                else:
                    rank = _ranks(torch.where(masked, lp, -math.inf))
                    commit = masked & ((lp.exp() > c.threshold) | (rank < c.min_per_step))
            else:
                reveal = (move[i] - move[i + 1]) / move[i]
                commit = masked & (u[:, 1] < reveal)
            x[:, pos_all] = torch.where(commit, cand, xs)  # masked => unknown, so known never moves
        if callback is not None:
            callback(i, t, x)
        # The threshold strategy's point is its adaptive length: one boolean read per step.
        if c.strategy == "threshold" and not bool((x[:, pos_all] == mask_id).any()):
            break

    # Final pass (release: noise removal): argmax of an unguided forward for anything still masked.
    still = x[:, pos_all] == mask_id
    if bool(still.any()):
        parts = logprobs(num_steps, 0.0, False)
        nfe += 1
        best = torch.cat([lp.argmax(-1) for lp in parts], -1) + vocab_start
        x[:, pos_all] = torch.where(still, best, x[:, pos_all])
    logger.debug("sampled %d rows in %d network evaluations", B, nfe)
    return SampleOutput(tokens=x, nfe=nfe)

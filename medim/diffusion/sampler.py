"""The sampling loop of every task: `sample` fills the unknown positions of a state by iterative
unmasking, with one of three strategies (maskgit, threshold, ddpm), classifier-free guidance and
optional context caching.

The loop is cut into the pieces a reader looks for: `_plan` decides everything static on the host
once (columns, commit counts, time grid, guidance); `_Network` runs the step's one batched forward
and `_log_weights` mixes its guided halves; `_draw` samples every requested position; `COMMITS`
holds one commit rule per strategy; `_CacheState` decides when context caching refreshes.
docs/sampling.md describes the settings, what they cost, and how medim matches the release.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from medim.utils.checks import check_choice, check_int, describe

from .config import COMMIT_SCHEDULES, GUIDANCE_SCHEDULES, STRATEGIES, SamplerConfig
from .draw import categorical, filter_logprobs, ranks
from .halton import halton_rank
from .schedule import get_schedule
from .segments import Segment, check_segments, check_tokens

__all__ = ["SampleOutput", "RolloutOutput", "sample", "rollout", "masked_before", "commit_counts", "guidance_weight",
           "STRATEGIES", "COMMIT_SCHEDULES", "GUIDANCE_SCHEDULES"]

logger = logging.getLogger(__name__)

Generator = torch.Generator | Sequence[torch.Generator] | None

# Context caching refreshes early once some row has committed this share of the tokens it generates
# since the last refresh: the cached keys/values would miss too much of the new context. (Relative
# to all the row's unknowns, not to those left: the last few tokens do not force full forwards.)
CACHE_REFRESH_FRACTION = 0.25


@dataclass
class SampleOutput:
    """tokens: the final state [B, N] (no mask id left). nfe: network evaluations (a guided step's
    batched conditional + unconditional forward counts as one)."""

    tokens: torch.LongTensor
    nfe: int


def commit_counts(
    num_unknown: Sequence[int] | torch.Tensor, num_steps: int, schedule: str = "arccos"
) -> torch.LongTensor:
    """How many tokens each row commits at each step, `[B, num_steps]` (arccos, cosine, linear: the
    release's `adap_sche` followed by its per-step cap; cosine_ratio: MaskGIT's mask ratio): at
    least one per step while a row has unknowns, all of them by the last step.

    Example:
        >>> commit_counts([10], 4).tolist()
        [[1, 2, 3, 4]]
        >>> commit_counts([40], 4, "cosine"), commit_counts([40], 4, "cosine_ratio")  # first step: 1 or 3
        (tensor([[ 1,  8, 15, 16]]), tensor([[ 3,  9, 13, 15]]))
    """
    check_choice(schedule, "schedule", COMMIT_SCHEDULES)
    m = torch.as_tensor(num_unknown, dtype=torch.long).reshape(-1, 1)
    if num_steps == 1:
        return m.clone()
    if schedule == "cosine_ratio":  # committed after step i: (1 - cos(pi/2 * i/S)) m, at least i, at most m
        i = torch.arange(1, num_steps + 1)
        done = torch.maximum(((1 - torch.cos(i / num_steps * math.pi * 0.5)) * m).round().long(), i).clamp(max=m)
        done[:, -1] = m[:, 0]
        return torch.diff(done, dim=-1, prepend=torch.zeros_like(m))
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


def _check_inputs(x: Any, known: Any, segments: Sequence[Segment], mask_id: int, generator: Any,
                  model_kwargs: Mapping[str, Any]) -> tuple[Segment, ...]:
    """The tensors of one call (the settings were checked when their SamplerConfig was made)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected a LongTensor [batch, state_len], got {describe(x)}")
    if not isinstance(known, torch.Tensor) or known.dtype != torch.bool or known.shape != x.shape:
        raise ValueError(f"known: expected a bool tensor of shape {list(x.shape)}, got {describe(known)}")
    segments = check_segments(segments, x.shape[1], mask_id)
    check_tokens(x, known, segments, "x (known positions)")
    check_generator(generator, x.shape[0])
    for name, value in model_kwargs.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != x.shape[0]):
            raise ValueError(f"model_kwargs[{name!r}]: tensors must be per row, first dim {x.shape[0]}")
    return segments


def _check_settings(denoiser: Any, segments: tuple[Segment, ...], config: SamplerConfig) -> None:
    """What the settings ask of this denoiser and layout."""
    if config.cache_interval is not None and not callable(getattr(denoiser, "cached", None)):
        raise ValueError(f"cache_interval={config.cache_interval} needs a denoiser with a `cached` method (e.g. "
                         "medim.models.denoiser.ModelDenoiser(model)); use cache_interval=None with a plain callable")
    if config.strategy == "maskgit" and config.order == "halton":
        for seg in segments:
            if seg.name == "image":
                halton_rank(seg.length)  # raises unless the image tokens form a square grid


@torch.no_grad()
def sample(
    denoiser: Callable[..., Mapping[str, torch.Tensor]],
    x: torch.LongTensor,
    known: torch.BoolTensor,
    *,
    segments: Sequence[Segment],
    mask_id: int,
    config: SamplerConfig | None = None,
    generator: Generator = None,
    model_kwargs: Mapping[str, Any] | None = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    progress: bool = False,
    check: bool = True,
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
            With `cache_interval` set it must also offer `denoiser.cached(x, sigma, positions, cache,
            **model_kwargs) -> (outputs, cache)`: `cache=None` runs the whole sequence and returns a
            cache serving `positions`; a cache back runs only what can change (as
            `medim.models.denoiser.ModelDenoiser`, the pipeline's denoiser, does). Its outputs
            where a row's token was not masked at the refresh are never used.
        x, known: the state `[B, N]` and the bool mask of given positions (see `medim.diffusion.tasks`);
            unknown positions may hold anything, known ones never change.
        segments, mask_id: `layout.segments`, `layout.mask_id`.
        config: the settings (`SamplerConfig`: steps, strategy, guidance, temperature, ...);
            default `SamplerConfig()`.
        generator: None, one torch.Generator, or one per row (row results independent of batching).
        model_kwargs: extra per-row model inputs (tensors with first dim B, repeated for guidance).
        callback: `callback(step, t, x)` after every step.
        progress: show a tqdm bar.
        check: check `x`, `known` (its known tokens lie in their segments' vocabularies: a read of
            the device), `segments`, `generator` and `model_kwargs`. False is for callers that
            validated them at their public edge, as the pipeline does: it samples in chunks and
            would otherwise read the device back for every chunk.
        **options: any `SamplerConfig` field, applied over `config` (e.g. `num_inference_steps=64`).

    Raises:
        FloatingPointError: the denoiser returned NaN (or values whose softmax is NaN) at a position
            the sampler drew from. Checked on the device during the loop and read once at the end.

    Example:
        >>> task = text_to_image(layout, report_ids)
        >>> out = sample(denoiser, task.x, task.known, segments=layout.segments,
        ...              mask_id=layout.mask_id, num_inference_steps=64, guidance_scale=5.0,
        ...              generator=torch.Generator().manual_seed(0))
        >>> out.tokens.shape, out.nfe
    """
    config = (config or SamplerConfig()).replace(**options)
    model_kwargs = dict(model_kwargs or {})
    if check:
        segments = _check_inputs(x, known, segments, mask_id, generator, model_kwargs)
    segments = tuple(segments)
    _check_settings(denoiser, segments, config)
    x = torch.where(known, x, mask_id)
    halton = config.strategy == "maskgit" and config.order == "halton"
    every = _Columns.of(segments, (~known).any(0), halton)
    if not every.requested:
        return SampleOutput(tokens=x, nfe=0)
    plan = _plan(known, every, halton=halton, segments=segments, mask_id=mask_id, config=config)
    network = _Network.of(denoiser, known, mask_id, model_kwargs)
    return _denoise(network, x, plan, generator, callback=callback, progress=progress)


@dataclass
class _Columns:
    """State positions the denoiser is asked for, grouped by segment, and what the loop needs of
    them: `requested` (segment, positions [K_s], offset into the concatenated K), `pos_all` [K],
    `vocab_start` [K] and, for the Halton order, `priority` [K] (minus the Halton rank of image columns)."""

    requested: list[tuple[Segment, torch.Tensor, int]]
    pos_all: torch.Tensor
    vocab_start: torch.Tensor
    priority: torch.Tensor | None

    @classmethod
    def of(cls, segments: Sequence[Segment], wanted: torch.Tensor, halton: bool) -> _Columns:
        """The positions where the bool `wanted` [N] is set (a host read per segment)."""
        requested, offset = [], 0
        for seg in segments:
            pos = torch.nonzero(wanted[seg.start : seg.stop]).squeeze(-1) + seg.start
            if pos.numel():
                requested.append((seg, pos, offset))
                offset += pos.numel()
        device = wanted.device
        pos_all = torch.cat([pos for _, pos, _ in requested]) if requested else wanted.new_zeros(0, dtype=torch.long)
        starts = [torch.full((p.numel(),), s.vocab_start, device=device) for s, p, _ in requested]
        priority = None
        if halton:
            priority = torch.cat([-halton_rank(s.length).to(device)[p - s.start].float() if s.name == "image"
                                  else torch.zeros(p.numel(), device=device) for s, p, _ in requested])
        return cls(requested, pos_all, torch.cat(starts) if starts else pos_all, priority)

    @property
    def positions(self) -> dict[str, torch.Tensor]:
        return {seg.name: pos for seg, pos, _ in self.requested}

    def subset(self, keep: torch.Tensor, segments: Sequence[Segment], halton: bool) -> _Columns:
        """The columns where the bool `keep` [K] is set."""
        wanted = torch.zeros(segments[-1].stop, dtype=torch.bool, device=keep.device)
        wanted[self.pos_all[keep]] = True
        return _Columns.of(segments, wanted, halton)


@dataclass
class _Plan:
    """Everything static of one call, decided on the host before the loop.

    Attributes:
        config, segments, mask_id, halton: the call's settings and layout (`halton`: maskgit's
            Halton order is on).
        every: the columns unknown in some row.
        columns: per step, the columns its forward asks for: `every`, or with the text-first order
            the phase's modality.
        counts: tokens each row commits per step, `{None: [B, S]}` on the device (with the Halton
            and text-first orders one table per segment name: each modality commits on its own
            schedule).
        active: per step, whether it runs a forward (maskgit: some row commits something).
        t, sigma, move: the time grid linspace(1, time_eps, S + 1) (text first: one such grid per
            phase, each from 1), the model's sigma on it (on the device) and the move chance.
        weight, guided: per step, the guidance weight and whether the step runs the guided batch.
        unknown: tokens to fill per row, float64 [B].
        left: tokens still masked per row before each step as far as the host knows without reading
            the device, float64 [S + 1, B] (maskgit: exact; ddpm: expected; threshold: read after
            each step). The cache's refresh rule reads it.
    """

    config: SamplerConfig
    segments: tuple[Segment, ...]
    mask_id: int
    halton: bool
    every: _Columns
    columns: list[_Columns]
    counts: dict[str | None, torch.Tensor]
    active: list[bool]
    t: list[float]
    sigma: torch.Tensor
    move: list[float]
    weight: list[float]
    guided: list[bool]
    unknown: torch.Tensor
    left: torch.Tensor

    @property
    def steps(self) -> int:
        return self.config.num_inference_steps


def _plan(known: torch.Tensor, every: _Columns, *, halton: bool, segments: tuple[Segment, ...], mask_id: int,
          config: SamplerConfig) -> _Plan:
    """The host-side tables of a call whose unknown columns are `every`."""
    steps = config.num_inference_steps
    host_counts, t_grid, spans = _counts(known, every, config)
    columns = [every] * steps
    for name, (lo, hi) in spans.items():  # text first: each phase asks for its own modality only
        phase = every.subset(torch.cat([torch.full((p.numel(),), s.name == name) for s, p, _ in every.requested]
                                       ).to(known.device), segments, halton)
        columns[lo:hi] = [phase] * (hi - lo)
    per_step = sum(host_counts.values())  # [B, steps]
    active = (per_step.sum(0) > 0).tolist() if config.strategy == "maskgit" else [True] * steps
    noise = get_schedule(config.noise_schedule)
    t, move = t_grid.tolist(), noise.move_chance(t_grid).tolist()
    weight, guided = _guidance(config, t, any_known=bool(known.any()))
    unknown = (~known).sum(-1).cpu().double()
    return _Plan(config=config, segments=segments, mask_id=mask_id, halton=halton, every=every, columns=columns,
                 counts={name: n.to(known.device) for name, n in host_counts.items()}, active=active, t=t,
                 sigma=noise.sigma(t_grid).to(known.device), move=move, weight=weight, guided=guided,
                 unknown=unknown, left=_tokens_left(config.strategy, unknown, per_step, move))


def _counts(known: torch.Tensor, every: _Columns, config: SamplerConfig
            ) -> tuple[dict[str | None, torch.Tensor], torch.Tensor, dict[str, tuple[int, int]]]:
    """Commit counts on the host (`{None: [B, S]}`, or one table per segment name), the time grid
    [S + 1] and, with the text-first order splitting a pair, each phase's steps `{name: (lo, hi)}`."""
    steps, schedule = config.num_inference_steps, config.schedule
    per_segment = config.strategy == "maskgit" and config.order != "confidence"
    names = [seg.name for seg, _, _ in every.requested]
    grid = torch.linspace(1, config.time_eps, steps + 1, dtype=torch.float32)
    if not per_segment:
        return {None: commit_counts((~known).sum(-1).cpu(), steps, schedule)}, grid, {}
    unknown = {seg.name: (~known[:, seg.start : seg.stop]).sum(-1).cpu() for seg, _, _ in every.requested}
    if config.order == "halton" or len(names) < 2 or steps < 2:
        return {name: commit_counts(unknown[name], steps, schedule) for name in names}, grid, {}
    # Text first: the report's phase, then the image's, each a run of its own from t = 1.
    a = min(max(round(config.text_share * steps), 1), steps - 1)
    spans = {"text": (0, a), "image": (a, steps)}
    counts = {}
    for name, (lo, hi) in spans.items():
        counts[name] = torch.zeros(len(unknown[name]), steps, dtype=torch.long)
        counts[name][:, lo:hi] = commit_counts(unknown[name], hi - lo, schedule)
    eps = config.time_eps
    grid = torch.cat([torch.linspace(1, eps, a + 1)[:-1], torch.linspace(1, eps, steps - a + 1)])
    return counts, grid, spans


def guidance_weight(scale: float, schedule: str, t: float) -> float:
    """The guidance weight w at time `t` (1: all masked): `scale * (1 - t)` on the "linear"
    schedule, `scale` on "constant"; the mix is (1 + w) cond - w uncond (`_log_weights`).

    Example:
        >>> guidance_weight(5.0, "linear", 0.25), guidance_weight(5.0, "constant", 0.25)
        (3.75, 5.0)
    """
    return scale * (1 - t) if schedule == "linear" else scale


def _guidance(config: SamplerConfig, t: list[float], *, any_known: bool) -> tuple[list[float], list[bool]]:
    """Per step, the guidance weight (`guidance_weight`) and whether the step runs the guided batch
    (something is known and the weight is positive)."""
    scale = config.guidance_scale
    weight = [guidance_weight(scale, config.guidance_schedule, ti) for ti in t]
    guided = [any_known and w > 0 for w in weight]
    if config.cache_interval is not None and any(guided):
        # The ramp's first step (w = 0) runs the guided batch as well, so both halves get their
        # cache at once instead of a second refresh one step later; (1 + 0) cond - 0 uncond is cond.
        guided = [any_known and scale > 0] * len(t)
    return weight, guided


def _tokens_left(strategy: str, unknown: torch.Tensor, per_step: torch.Tensor, move: list[float]) -> torch.Tensor:
    """The host's estimate of the tokens still masked per row before each step, [S + 1, B]."""
    if strategy == "maskgit":  # exact: the commit counts
        return unknown - torch.cat([torch.zeros(len(unknown), 1), per_step.cumsum(-1)], -1).T.double()
    if strategy == "ddpm":  # expected: the move chance falls from move[0] to move[i]
        return unknown * torch.tensor(move, dtype=torch.float64)[:, None] / move[0]
    return unknown.repeat(len(move), 1)  # threshold: read from the device after each step


@dataclass
class _Network:
    """The denoiser with the per-row inputs of one call: `kwargs` as given and `guided_kwargs`
    twice over, for the guided batch [conditional; unconditional (the known positions masked)]."""

    denoiser: Callable[..., Mapping[str, torch.Tensor]]
    known: torch.Tensor
    mask_id: int
    kwargs: dict[str, Any]
    guided_kwargs: dict[str, Any]

    @classmethod
    def of(cls, denoiser: Callable[..., Mapping[str, torch.Tensor]], known: torch.Tensor, mask_id: int,
           model_kwargs: dict[str, Any]) -> _Network:
        guided = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
        return cls(denoiser, known, mask_id, model_kwargs, guided)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, columns: _Columns, *, guided: bool,
                 cache: Any = None, cached: bool = False) -> tuple[Mapping[str, torch.Tensor], Any]:
        """One forward at `columns` (one batch even when guided), plain or through
        `denoiser.cached` (`cached=True`; `cache=None` refreshes). Returns the outputs and the cache."""
        sigma = sigma.expand(x.shape[0])
        if guided:
            hidden = torch.where(self.known, self.mask_id, x)  # the condition hidden, everything else as is
            args, kwargs = (torch.cat([x, hidden]), torch.cat([sigma, sigma]), columns.positions), self.guided_kwargs
        else:
            args, kwargs = (x, sigma, columns.positions), self.kwargs
        if not cached:
            return self.denoiser(*args, **kwargs), None
        return self.denoiser.cached(*args, cache, **kwargs)


def _log_weights(out: Mapping[str, torch.Tensor], columns: _Columns, rows: int,
                 weight: float | None) -> list[torch.Tensor]:
    """Per requested segment, float32 log-weights [rows, K_s, V_s] of the denoiser's output: its
    log-probs up to a per-position constant (raw logits in), or with a guidance `weight` the
    unnormalised mix (1 + w) cond - w uncond of its two halves."""
    parts = []
    for seg, pos, _ in columns.requested:
        lp = out[seg.name]
        expected = [rows * (1 if weight is None else 2), pos.numel(), seg.vocab_size]
        if list(lp.shape) != expected:
            raise ValueError(f"denoiser: expected log-probs or logits {expected} for segment {seg.name!r}, "
                             f"got {list(lp.shape)}")
        lp = lp.float()
        if weight is not None:
            # Written over the unconditional half (no new [B, K, V] tensor); left unnormalised:
            # `_draw` normalises it on the way.
            cond, uncond = lp.chunk(2)
            lp = uncond.lerp_(cond, 1 + weight)
        parts.append(lp)
    return parts


def _draw(parts: list[torch.Tensor], columns: _Columns, u: torch.Tensor,
          config: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample every requested position with its uniforms `u` [B, K]: returns the candidate ids and
    their log-probs [B, K]. `parts` hold unnormalised log-weights and are overwritten."""
    temperature, top_k, top_p = config.temperature, config.top_k, config.top_p
    plain = temperature == 1.0 and top_k is None and top_p is None
    ids, lps = [], []
    for (_, _, off), z in zip(columns.requested, parts):
        if plain:
            # Probabilities in place (one fused pass over each row, no new [B, K, V] tensor);
            # log p(sample) is read back from them.
            probs = torch.softmax(z, -1, out=z)
            idx, total = categorical(probs, u[:, off : off + z.shape[1]])
            lps.append(probs.gather(-1, idx[..., None]).squeeze(-1).log() - total.log())
        else:
            lp = z.log_softmax(-1)
            if temperature == 0:
                idx = lp.argmax(-1)
            else:
                lp = filter_logprobs(lp, temperature, top_k, top_p)
                idx = categorical(lp.exp(), u[:, off : off + lp.shape[1]])[0]
            lps.append(lp.gather(-1, idx[..., None]).squeeze(-1))
        ids.append(idx)
    return torch.cat(ids, -1) + columns.vocab_start, torch.cat(lps, -1)


def _commit_maskgit(plan: _Plan, columns: _Columns, step: int, logprobs: torch.Tensor, masked: torch.Tensor,
                    coin: torch.Tensor) -> torch.Tensor:
    """The most confident masked tokens of each row, as many as the step's commit count; confidence
    = log p + confidence_temperature * t * Gumbel (from `coin`). With the Halton order image columns
    rank by their Halton priority and text by confidence, each modality on its own counts (as with
    the text-first order, whose columns all rank by confidence)."""
    gumbel = -torch.log(-torch.log(coin.clamp(1e-20, 1 - 1e-7)))
    conf = torch.where(masked, logprobs + (plan.config.confidence_temperature * plan.t[step]) * gumbel, -math.inf)
    if None in plan.counts:
        return masked & (ranks(conf) < plan.counts[None][:, step : step + 1])
    commit = torch.empty_like(masked)
    for seg, pos, off in columns.requested:
        block = slice(off, off + pos.numel())
        image = plan.halton and seg.name == "image"
        score = torch.where(masked[:, block], columns.priority[block], -math.inf) if image else conf[:, block]
        commit[:, block] = masked[:, block] & (ranks(score) < plan.counts[seg.name][:, step : step + 1])
    return commit


def _commit_threshold(plan: _Plan, columns: _Columns, step: int, logprobs: torch.Tensor, masked: torch.Tensor,
                      coin: torch.Tensor) -> torch.Tensor:
    """Every masked token whose sampled probability exceeds `threshold`, at least `min_per_step`
    (the most probable) per row; everything at the last step."""
    if step == plan.steps - 1:
        return masked
    rank = ranks(torch.where(masked, logprobs, -math.inf))
    return masked & ((logprobs.exp() > plan.config.threshold) | (rank < plan.config.min_per_step))


def _commit_ddpm(plan: _Plan, columns: _Columns, step: int, logprobs: torch.Tensor, masked: torch.Tensor,
                 coin: torch.Tensor) -> torch.Tensor:
    """MDLM's ancestral step: each masked token is revealed with probability
    (move_t - move_s) / move_t, decided by `coin`."""
    reveal = (plan.move[step] - plan.move[step + 1]) / plan.move[step]
    return masked & (coin < reveal)


# One commit rule per strategy: (plan, columns, step, log p of the candidates [B, K], masked [B, K],
# the step's second uniforms [B, K]) -> the bool [B, K] of columns to commit.
COMMITS: dict[str, Callable[..., torch.Tensor]] = {
    "maskgit": _commit_maskgit,
    "threshold": _commit_threshold,
    "ddpm": _commit_ddpm,
}


@dataclass
class _CacheState:
    """Context caching between refreshes: `columns` are those still masked in some row at the last
    refresh (only they can change until the next one, so the denoiser runs only what depends on
    them), `cache` the denoiser's cache, `guided` whether it serves the guided batch, `refreshed`
    the step of the last refresh."""

    columns: _Columns
    cache: Any = None
    guided: bool | None = None
    refreshed: int = 0

    def due(self, plan: _Plan, step: int) -> bool:
        """Refresh at `step`: no cache yet, the batch changes (guided or not), a text-first phase
        begins, `cache_interval` steps passed, or some row committed `CACHE_REFRESH_FRACTION` of its
        unknowns since the last refresh (by the host's estimate `plan.left`: no device read)."""
        done = (plan.left[self.refreshed] - plan.left[step]) / plan.unknown.clamp(min=1)
        return (self.cache is None or self.guided != plan.guided[step]
                or plan.columns[step] is not plan.columns[self.refreshed]
                or step - self.refreshed >= plan.config.cache_interval or float(done.max()) > CACHE_REFRESH_FRACTION)

    def forward(self, network: _Network, x: torch.Tensor, plan: _Plan, step: int) -> Mapping[str, torch.Tensor] | None:
        """The step's forward, refreshing first when due; None when nothing is left to fill."""
        if self.due(plan, step):
            # Host reads at a refresh only: the columns still masked in some row.
            every = plan.columns[step]
            self.columns = every.subset((x[:, every.pos_all] == plan.mask_id).any(0), plan.segments, plan.halton)
            self.cache, self.guided, self.refreshed = None, plan.guided[step], step
        if not self.columns.requested:  # ddpm can finish early
            return None
        out, self.cache = network(x, plan.sigma[step], self.columns, guided=plan.guided[step], cache=self.cache,
                                  cached=True)
        return out


def _uniforms(generator: Generator, rows: int, length: int, device: torch.device) -> torch.Tensor:
    """The step's random numbers, [rows, 2, length]: plane 0 drives the categorical draw, plane 1
    the Gumbel confidence (maskgit) or the unmasking coin (ddpm). Drawn every step, used or not, so
    the streams stay aligned; one [2, length] draw per row with a list of generators, so row r's
    tokens are the same alone or inside any batch."""
    if generator is None:
        return torch.rand(rows, 2, length, device=device)
    if isinstance(generator, torch.Generator):
        return torch.rand(rows, 2, length, generator=generator, device=generator.device).to(device)
    # One small draw per row: the price of results that do not depend on the batch.
    return torch.stack([torch.rand(2, length, generator=g, device=g.device).to(device) for g in generator])


def _update(x: torch.Tensor, plan: _Plan, columns: _Columns, out: Mapping[str, torch.Tensor], step: int,
            u: torch.Tensor, *, record: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Draw every requested column from the step's output and commit the strategy's choice into
    `x` (in place). Returns whether the draw met a NaN, as a device bool (no sync). `record` (a
    rollout's, one float32 [B, K_s, V_s] per requested segment): where a column is masked before
    this step, overwritten with the normalised distribution the step draws it from."""
    parts = _log_weights(out, columns, x.shape[0], plan.weight[step] if plan.guided[step] else None)
    current = x[:, columns.pos_all]
    masked = current == plan.mask_id
    if record is not None:  # before the draw, which overwrites `parts`
        for (_, pos, off), z, kept in zip(columns.requested, parts, record):
            kept.copy_(torch.where(masked[:, off : off + pos.numel(), None], z.log_softmax(-1), kept))
    u = u[:, :, columns.pos_all]
    candidates, logprobs = _draw(parts, columns, u[:, 0], plan.config)
    commit = COMMITS[plan.config.strategy](plan, columns, step, logprobs, masked, u[:, 1])
    x[:, columns.pos_all] = torch.where(commit, candidates, current)  # masked => unknown, so known never moves
    return logprobs.isnan().any()


def _threshold_done(x: torch.Tensor, plan: _Plan, step: int) -> bool:
    """The threshold strategy's adaptive length: one device read per step, the tokens each row
    still has masked (kept in `plan.left` for the cache's refresh rule). True when none is left."""
    plan.left[step + 1] = (x[:, plan.every.pos_all] == plan.mask_id).sum(-1).cpu().double()
    return not bool(plan.left[step + 1].any())


def _final_pass(network: _Network, x: torch.Tensor, plan: _Plan) -> torch.Tensor | None:
    """Argmax of an unguided forward at the last time for anything still masked (the release's
    noise removal; with maskgit and threshold the counts leave nothing). Returns None when it did
    not run, else whether it met a NaN (a device bool)."""
    every = plan.every
    still = x[:, every.pos_all] == plan.mask_id
    if not bool(still.any()):
        return None
    out, _ = network(x, plan.sigma[plan.steps], every, guided=False)
    best = [lp.max(-1) for lp in _log_weights(out, every, x.shape[0], None)]
    ids = torch.cat([b.indices for b in best], -1) + every.vocab_start
    x[:, every.pos_all] = torch.where(still, ids, x[:, every.pos_all])
    return torch.cat([b.values for b in best], -1).isnan().any()


def _denoise(network: _Network, x: torch.Tensor, plan: _Plan, generator: Generator, *,
             callback: Callable[[int, float, torch.Tensor], None] | None, progress: bool) -> SampleOutput:
    """The loop itself, on checked inputs: `x` [B, N] with the mask id at every unknown position."""
    cache = _CacheState(plan.every) if plan.config.cache_interval is not None else None
    # First step whose draw met a NaN (-1: none; `steps`: the final pass): kept on the device, read
    # once after the loop.
    first_nan = torch.full((), -1, dtype=torch.long, device=x.device)
    nfe = 0
    for i in tqdm(range(plan.steps), desc="Sampling", disable=not progress):
        u = _uniforms(generator, x.shape[0], x.shape[1], x.device)
        if plan.active[i]:
            if cache is None:
                columns = plan.columns[i]
                out, _ = network(x, plan.sigma[i], columns, guided=plan.guided[i])
            else:
                out = cache.forward(network, x, plan, i)
                if out is None:  # nothing left to fill: no forward, no callback
                    continue
                columns = cache.columns
            nfe += 1
            first_nan = torch.where((first_nan < 0) & _update(x, plan, columns, out, i, u), i, first_nan)
        if callback is not None:
            callback(i, plan.t[i], x)
        if plan.config.strategy == "threshold" and _threshold_done(x, plan, i):
            break
    met_nan = _final_pass(network, x, plan)
    if met_nan is not None:
        nfe += 1
        first_nan = torch.where((first_nan < 0) & met_nan, plan.steps, first_nan)
    _raise_on_nan(int(first_nan), plan.steps)
    logger.debug("sampled %d rows in %d network evaluations", x.shape[0], nfe)
    return SampleOutput(tokens=x, nfe=nfe)


def _raise_on_nan(step: int, steps: int) -> None:
    """FloatingPointError if a draw met a NaN (`step` >= 0: the first step that did)."""
    if step < 0:
        return
    where = f"step {step} of {steps}" if step < steps else "the final pass"
    raise FloatingPointError(
        f"denoiser returned NaN at {where}: the tokens would be meaningless. The model's weights or "
        "inputs are not finite (a diverged training run, or a bad dtype?); check them with "
        "`all(p.isfinite().all() for p in model.parameters())`"
    )


# ------------------------------------------------------------------ a window of steps (distillation)


@dataclass
class RolloutOutput:
    """What `rollout` returns. tokens: the state after the window [B, N]. positions: the columns
    the denoiser was asked for, `{segment: LongTensor [K_s]}`. logprobs: per segment, float32
    [B, K_s, V_s]: for each column masked at the start, the normalised distribution (guided mix
    included) it was drawn from at the step that committed it, or of the window's last step when
    none did; columns given at the start hold zeros. sigma: the model's sigma at the first step
    (a 0-dim tensor): what a student replacing the window is fed."""

    tokens: torch.LongTensor
    positions: dict[str, torch.Tensor]
    logprobs: dict[str, torch.Tensor]
    sigma: torch.Tensor


def masked_before(known: torch.BoolTensor, config: SamplerConfig, step: int) -> torch.LongTensor:
    """How many tokens of each row `sample` still has masked before `step` (0-based) of a run with
    `config` on a task whose given positions are `known` [B, N]: exact for maskgit (its commit
    counts), the rounded expectation for ddpm; threshold commits adaptively and is refused.

    Example:
        >>> masked_before(torch.zeros(1, 10, dtype=torch.bool), SamplerConfig(num_inference_steps=4), 2)
        tensor([7])
    """
    if config.strategy == "threshold":
        raise ValueError("strategy='threshold' commits adaptively: no fixed count of masked tokens per step; "
                         "use maskgit or ddpm")
    if config.strategy == "maskgit" and config.order != "confidence":
        raise ValueError(f"order={config.order!r} commits each modality on its own counts, which `masked_before` "
                         "does not follow; use order='confidence'")
    check_int(step, "step", minimum=0, maximum=config.num_inference_steps)
    unknown = (~known).sum(-1).cpu()
    per_step = commit_counts(unknown, config.num_inference_steps, config.schedule)
    t_grid = torch.linspace(1, config.time_eps, config.num_inference_steps + 1, dtype=torch.float32)
    move = get_schedule(config.noise_schedule).move_chance(t_grid).tolist()
    left = _tokens_left(config.strategy, unknown.double(), per_step, move)
    return left[step].round().long().to(known.device)


@torch.no_grad()
def rollout(
    denoiser: Callable[..., Mapping[str, torch.Tensor]],
    x: torch.LongTensor,
    known: torch.BoolTensor,
    *,
    segments: Sequence[Segment],
    mask_id: int,
    config: SamplerConfig,
    start: int,
    stop: int,
    generator: Generator = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> RolloutOutput:
    """Run steps [start, stop) of `sample` with `config` on the task `known`, from the state `x`
    it would hold before step `start` (the mask id where still masked: `masked_before` says how
    many), and keep the distribution each masked column was drawn from (self-distillation
    through time: a student replacing these steps by one learns them; docs/training.md).

    The steps are `sample`'s own (plan, batched guided forward, draw, commit rule), so a rollout
    from the start of a task gives `sample`'s tokens after `stop` steps with the same generator.
    Context caching is not used; a NaN in the denoiser's output raises FloatingPointError.

    Example:
        >>> config = SamplerConfig(num_inference_steps=32)
        >>> out = rollout(denoiser, x, task.known, segments=layout.segments, mask_id=layout.mask_id,
        ...               config=config, start=8, stop=10, generator=torch.Generator().manual_seed(0))
        >>> out.logprobs["image"].shape
    """
    model_kwargs = dict(model_kwargs or {})
    segments = _check_inputs(x, known, segments, mask_id, generator, model_kwargs)
    check_int(stop, "stop", minimum=1, maximum=config.num_inference_steps)
    check_int(start, "start", minimum=0, maximum=stop - 1)
    config = config.replace(cache_interval=None)
    _check_settings(denoiser, segments, config)
    x = x.clone()
    halton = config.strategy == "maskgit" and config.order == "halton"
    every = _Columns.of(segments, (~known).any(0), halton)
    plan = _plan(known, every, halton=halton, segments=segments, mask_id=mask_id, config=config)
    network = _Network.of(denoiser, known, mask_id, model_kwargs)
    record = [x.new_zeros((x.shape[0], pos.numel(), seg.vocab_size), dtype=torch.float32)
              for seg, pos, _ in every.requested]
    first_nan = torch.full((), -1, dtype=torch.long, device=x.device)
    for i in range(stop):
        u = _uniforms(generator, x.shape[0], x.shape[1], x.device)  # drawn from step 0: `sample`'s stream
        if i < start or not plan.active[i]:
            continue
        out, _ = network(x, plan.sigma[i], every, guided=plan.guided[i])
        first_nan = torch.where((first_nan < 0) & _update(x, plan, every, out, i, u, record=record), i, first_nan)
    _raise_on_nan(int(first_nan), config.num_inference_steps)
    return RolloutOutput(tokens=x, positions=every.positions, sigma=plan.sigma[start],
                         logprobs={seg.name: r for (seg, _, _), r in zip(every.requested, record)})

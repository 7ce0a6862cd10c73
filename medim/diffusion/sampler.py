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

Beyond the release (off by default; docs/sampling.md has the measured trade-offs): maskgit's
`order="halton"` commits image tokens in a spatial low-discrepancy order (medim/diffusion/halton.py);
`cache_interval` reuses the keys/values of unchanged positions between refreshes (the denoiser's
`cached` method; host reads at refreshes only: which columns are still masked, and the active count). A NaN in the
denoiser's output raises FloatingPointError: a device flag records the first step that drew from
one, read once after the loop, so the check costs no host synchronisation per step.
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
from .draw import categorical, filter_logprobs, ranks
from .halton import halton_rank
from .schedule import get_schedule
from .segments import Segment, check_segments, check_tokens

__all__ = ["SampleOutput", "sample", "commit_counts", "STRATEGIES", "COMMIT_SCHEDULES", "GUIDANCE_SCHEDULES"]

logger = logging.getLogger(__name__)

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
    segments = _check_inputs(x, known, segments, mask_id, generator, model_kwargs)
    if config.cache_interval is not None and not callable(getattr(denoiser, "cached", None)):
        raise ValueError(f"cache_interval={config.cache_interval} needs a denoiser with a `cached` method (e.g. "
                         "medim.models.denoiser.ModelDenoiser(model)); use cache_interval=None with a plain callable")
    if config.strategy == "maskgit" and config.order == "halton":
        for seg in segments:
            if seg.name == "image":
                halton_rank(seg.length)  # raises unless the image tokens form a square grid
    return _denoise(denoiser, x, known, segments, mask_id, config, generator, model_kwargs, callback, progress)


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
    def of(cls, segments, wanted: torch.Tensor, halton: bool) -> _Columns:
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

    def subset(self, keep: torch.Tensor, segments, halton: bool) -> _Columns:
        """The columns where the bool `keep` [K] is set."""
        wanted = torch.zeros(segments[-1].stop, dtype=torch.bool, device=keep.device)
        wanted[self.pos_all[keep]] = True
        return _Columns.of(segments, wanted, halton)


def _denoise(denoiser, x, known, segments, mask_id, c: SamplerConfig, generator, model_kwargs, callback, progress):
    """The loop itself, on checked inputs (`c`: the settings)."""
    noise = get_schedule(c.noise_schedule)
    B, N = x.shape
    device = x.device
    x = torch.where(known, x, mask_id)
    halton = c.strategy == "maskgit" and c.order == "halton"

    # Everything static is decided here, on the host, once: which positions to ask for, how many
    # tokens each row commits per step, the time grid and the guidance weight of each step.
    every = _Columns.of(segments, (~known).any(0), halton)
    if not every.requested:
        return SampleOutput(tokens=x, nfe=0)

    num_steps = c.num_inference_steps
    if halton:  # each modality commits on its own schedule: image in Halton order, text by confidence
        host_counts = {seg.name: commit_counts((~known[:, seg.start : seg.stop]).sum(-1).cpu(), num_steps, c.schedule)
                       for seg, _, _ in every.requested}
    else:
        host_counts = {None: commit_counts((~known).sum(-1).cpu(), num_steps, c.schedule)}
    per_step = sum(host_counts.values())  # [B, num_steps]
    active = (per_step.sum(0) > 0).tolist() if c.strategy == "maskgit" else [True] * num_steps
    counts = {name: n.to(device) for name, n in host_counts.items()}
    t_grid = torch.linspace(1, c.time_eps, num_steps + 1, dtype=torch.float32)
    sigma_grid = noise.sigma(t_grid).to(device)
    move = noise.move_chance(t_grid).tolist()
    t_list = t_grid.tolist()
    any_known = bool(known.any())
    ramp = [c.guidance_scale * (1 - t) if c.guidance_schedule == "linear" else c.guidance_scale for t in t_list]
    guided = [any_known and w > 0 for w in ramp]
    caching = c.cache_interval is not None
    if caching and any(guided):
        # The ramp's first step (w = 0) runs the guided batch as well, so both halves get their
        # cache at once instead of a second refresh one step later; (1 + 0) cond - 0 uncond is cond.
        guided = [any_known and c.guidance_scale > 0] * (num_steps + 1)
    # The guided forward runs [conditional; unconditional] as one batch: per-row inputs twice.
    guided_kwargs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
    # Tokens still masked per row before each step, as far as the host knows without reading the
    # device (maskgit: exact; ddpm: expected; threshold: read after each step): the cache's refresh rule.
    unknown = (~known).sum(-1).cpu().double()
    if c.strategy == "maskgit":
        left = unknown - torch.cat([torch.zeros(B, 1), per_step.cumsum(-1)], -1).T.double()
    elif c.strategy == "ddpm":
        left = unknown * torch.tensor(move, dtype=torch.float64)[:, None] / move[0]
    else:
        left = unknown.repeat(num_steps + 1, 1)

    def logprobs(cols: _Columns, i: int, w: float, use_guidance: bool, cache=None) -> tuple[list, Any]:
        """Per requested segment, float32 (guided) log-weights [B, K_s, V_s]: log-probs up to a
        per-position constant (raw logits in, or the unnormalised guidance mix); and the cache."""
        sigma = sigma_grid[i].expand(B)
        if use_guidance:
            xu = torch.where(known, mask_id, x)  # the condition hidden, everything else as is
            args = (torch.cat([x, xu]), torch.cat([sigma, sigma]), cols.positions)
            kwargs = guided_kwargs
        else:
            args, kwargs = (x, sigma, cols.positions), model_kwargs
        if cache is False:  # uncached
            out = denoiser(*args, **kwargs)
        else:
            out, cache = denoiser.cached(*args, cache, **kwargs)
        parts = []
        for seg, pos, _ in cols.requested:
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
        return parts, cache

    temperature, top_k, top_p = c.temperature, c.top_k, c.top_p
    plain = temperature == 1.0 and top_k is None and top_p is None

    def draw(cols: _Columns, parts, u):
        """Sample every requested position: returns candidate ids and their log-probs [B, K].
        `parts` hold unnormalised log-weights and are overwritten."""
        ids, lps = [], []
        for (_, _, off), z in zip(cols.requested, parts):
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
        return torch.cat(ids, -1) + cols.vocab_start, torch.cat(lps, -1)

    def maskgit_commit(cols: _Columns, i: int, lp, masked, gumbel):
        conf = torch.where(masked, lp + (c.confidence_temperature * t_list[i]) * gumbel, -math.inf)
        if not halton:
            return masked & (ranks(conf) < counts[None][:, i : i + 1])
        commit = torch.empty_like(masked)
        for seg, pos, off in cols.requested:  # each modality ranks its own columns
            block = slice(off, off + pos.numel())
            score = torch.where(masked[:, block], cols.priority[block], -math.inf) if seg.name == "image" else conf[:, block]
            commit[:, block] = masked[:, block] & (ranks(score) < counts[seg.name][:, i : i + 1])
        return commit

    # Context caching: `cols` are the columns still masked in some row at the last refresh; between
    # refreshes only they can change, so the denoiser runs only what depends on them.
    cols, cache, cache_mode, refreshed = every, None, None, 0
    # First step whose draw met a NaN (-1: none): kept on the device, read once after the loop.
    first_nan = torch.full((), -1, dtype=torch.long, device=device)
    nfe = 0
    steps = tqdm(range(num_steps), desc="Sampling", disable=not progress)
    for i in steps:
        t = t_list[i]
        u = _uniforms(generator, B, N, device)  # drawn every step: streams stay aligned
        if active[i]:
            if not caching:
                parts, _ = logprobs(every, i, ramp[i], guided[i], cache=False)
            else:
                done = (left[refreshed] - left[i]) / unknown.clamp(min=1)
                if (cache is None or cache_mode != guided[i] or i - refreshed >= c.cache_interval
                        or float(done.max()) > CACHE_REFRESH_FRACTION):
                    # Host reads at a refresh only: the columns still masked in some row.
                    cols = every.subset((x[:, every.pos_all] == mask_id).any(0), segments, halton)
                    cache, cache_mode, refreshed = None, guided[i], i
                if not cols.requested:  # nothing left to fill (ddpm can finish early)
                    continue
                parts, cache = logprobs(cols, i, ramp[i], guided[i], cache)
            nfe += 1
            uc = u[:, :, cols.pos_all]
            cand, lp = draw(cols, parts, uc[:, 0])
            first_nan = torch.where((first_nan < 0) & lp.isnan().any(), i, first_nan)
            xs = x[:, cols.pos_all]
            masked = xs == mask_id
            if c.strategy == "maskgit":
                commit = maskgit_commit(cols, i, lp, masked, -torch.log(-torch.log(uc[:, 1].clamp(1e-20, 1 - 1e-7))))
            elif c.strategy == "threshold":
                if i == num_steps - 1:
                    commit = masked
                else:
                    rank = ranks(torch.where(masked, lp, -math.inf))
                    commit = masked & ((lp.exp() > c.threshold) | (rank < c.min_per_step))
            else:
                reveal = (move[i] - move[i + 1]) / move[i]
                commit = masked & (uc[:, 1] < reveal)
            x[:, cols.pos_all] = torch.where(commit, cand, xs)  # masked => unknown, so known never moves
        if callback is not None:
            callback(i, t, x)
        # The threshold strategy's point is its adaptive length: one read per step.
        if c.strategy == "threshold":
            left[i + 1] = (x[:, every.pos_all] == mask_id).sum(-1).cpu().double()
            if not bool(left[i + 1].any()):
                break

    # Final pass (release: noise removal): argmax of an unguided forward for anything still masked.
    still = x[:, every.pos_all] == mask_id
    if bool(still.any()):
        parts, _ = logprobs(every, num_steps, 0.0, False, cache=False)
        nfe += 1
        best = [lp.max(-1) for lp in parts]
        first_nan = torch.where((first_nan < 0) & torch.cat([b.values for b in best], -1).isnan().any(),
                                num_steps, first_nan)
        x[:, every.pos_all] = torch.where(still, torch.cat([b.indices for b in best], -1) + every.vocab_start,
                                          x[:, every.pos_all])
    step = int(first_nan)
    if step >= 0:
        where = f"step {step} of {num_steps}" if step < num_steps else "the final pass"
        raise FloatingPointError(
            f"denoiser returned NaN at {where}: the tokens would be meaningless. The model's weights or "
            "inputs are not finite (a diverged training run, or a bad dtype?); check them with "
            "`all(p.isfinite().all() for p in model.parameters())`"
        )
    logger.debug("sampled %d rows in %d network evaluations", B, nfe)
    return SampleOutput(tokens=x, nfe=nfe)

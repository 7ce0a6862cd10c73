"""Forward masking q(x_t | x_0), the MDLM (SUBS) training loss and the per-position ELBO terms that
scoring (`medim.pipelines.scoring`) averages.

Recipe (the release's, docs/formats.md): one time t per sample, drawn by stratified antithetic sampling in
[eps, 1]; every token masked independently with the schedule's move chance 1 - exp(-sigma(t));
the loss is -log p(x_0) at masked positions, weighted by dsigma / expm1(sigma) (exactly 1/t for the
log-linear schedule). Unmasked positions contribute nothing (SUBS: the model copies them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medim.utils.checks import check_number

from .schedule import NoiseSchedule, get_schedule
from .segments import Segment, check_segments, check_tokens

__all__ = ["LossOutput", "sample_times", "diffusion_loss", "elbo_terms"]


@dataclass
class LossOutput:
    """Result of `diffusion_loss`.

    loss: scalar to back-propagate. per_modality: detached per-token loss of each segment (its
    weighted NLL sum over its counted tokens). num_tokens / num_masked: counted tokens and those of
    them that were masked (long scalars, kept on device so logging needs no sync). t: the times [B].
    """

    loss: torch.Tensor
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: torch.Tensor | None = None
    num_masked: torch.Tensor | None = None
    t: torch.Tensor | None = None


def _rand(shape: tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_times(
    batch_size: int,
    *,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stratified (antithetic) times in [eps, 1]: row i gets one draw from stratum [i/B, (i+1)/B),
    so every batch covers the whole time range (lower variance than i.i.d. times)."""
    u = _rand((batch_size,), generator, torch.device(device or "cpu"))
    u = (u + torch.arange(batch_size, device=u.device)) / batch_size
    return (1 - eps) * u + eps


def _as_mask(m: torch.Tensor | None, shape: torch.Size, name: str, default: bool, device) -> torch.Tensor:
    if m is None:
        return torch.full(shape, default, dtype=torch.bool, device=device)
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != shape:
        got = f"{m.dtype} {list(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name}: expected a bool tensor of shape {list(shape)}, got {got}")
    return m


def _position_masks(x0: torch.Tensor, known: Any, hidden: Any, loss_mask: Any) -> tuple[torch.Tensor, ...]:
    """`diffusion_loss`'s known, hidden (not known) and counted (neither) positions, checked, [B, N]."""
    known = _as_mask(known, x0.shape, "known", False, x0.device)
    hidden = _as_mask(hidden, x0.shape, "hidden", False, x0.device) & ~known
    return known, hidden, _as_mask(loss_mask, x0.shape, "loss_mask", True, x0.device) & ~known & ~hidden


def _check_states(x0: Any, segments: Sequence[Segment], mask_id: int, validate_tokens: bool) -> tuple[Segment, ...]:
    """`x0` is a LongTensor [B, N] that `segments` tile (and, if `validate_tokens`, whose ids lie in
    their segments' vocabularies); returns the segments as a tuple."""
    if not isinstance(x0, torch.Tensor) or x0.dtype != torch.long or x0.dim() != 2 or x0.shape[0] < 1:
        raise ValueError(f"x0: expected a LongTensor [batch, state_len], got {x0!r:.80}")
    segments = check_segments(segments, x0.shape[1], mask_id)
    if validate_tokens:
        check_tokens(x0, None, segments, "x0")
    return segments


def _check_options(*, keep_prefix_prob: float, cond_drop_prob: float, cond_keep_prob: float, time_eps: float,
                   snr_cap: float | None) -> None:
    for name, p in (("keep_prefix_prob", keep_prefix_prob), ("cond_drop_prob", cond_drop_prob),
                    ("cond_keep_prob", cond_keep_prob)):
        check_number(p, name, minimum=0.0, maximum=1.0)
    if not 0.0 < time_eps < 1.0:
        raise ValueError(f"time_eps: expected a value in (0, 1), got {time_eps!r}")
    if snr_cap is not None and not snr_cap > 0:
        raise ValueError(f"snr_cap: expected None or a positive number, got {snr_cap!r}")


def _modality_weights(segments: Sequence[Segment], modality_weights: Mapping[str, float] | None) -> dict[str, float]:
    """Each segment's weight: 1 unless `modality_weights` names it."""
    names = [seg.name for seg in segments]
    weights = dict.fromkeys(names, 1.0)
    for name, value in (modality_weights or {}).items():
        if name not in weights:
            raise ValueError(f"modality_weights: unknown segment {name!r}; accepted: {names}")
        weights[name] = float(value)
    return weights


def _prefix_lengths(prefix_len: torch.Tensor | Sequence[int] | int | None, keep_prefix_prob: float, rows: int,
                    device: torch.device) -> torch.Tensor | None:
    """The prefix length of every row [rows] when prefixes may be kept, else None."""
    if not keep_prefix_prob > 0:
        return None
    if prefix_len is None:
        raise ValueError("prefix_len: required (int or one length per row) when keep_prefix_prob > 0")
    return torch.as_tensor(prefix_len, dtype=torch.long, device=device).expand(rows)


def _whole_segments(prob: float, segment_of: torch.Tensor, num_segments: int, rows: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[rows, N]: one uniformly chosen segment (`segment_of` [N]: each position's) of the rows
    chosen with probability `prob`."""
    device = segment_of.device
    chosen = _rand((rows,), generator, device) < prob
    which = (_rand((rows,), generator, device) * num_segments).long().clamp(max=num_segments - 1)
    return chosen[:, None] & (segment_of[None] == which[:, None])


def _mask(x0: torch.Tensor, t: torch.Tensor, known: torch.Tensor, counted: torch.Tensor, *, schedule: NoiseSchedule,
          segments: Sequence[Segment], generator: torch.Generator | None, keep_prefix_prob: float,
          prefix_len: torch.Tensor | None, cond_drop_prob: float,
          cond_keep_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process q(x_t | x_0) with the recipe's row options: returns which positions are
    masked and which count, both [B, N] (random numbers in the order `diffusion_loss` documents)."""
    B, N = x0.shape
    device = x0.device
    masked = (_rand((B, N), generator, device) < schedule.move_chance(t)[:, None]) & ~known
    if prefix_len is not None:  # set when keep_prefix_prob > 0
        keep = _rand((B,), generator, device) < keep_prefix_prob
        masked &= ~(keep[:, None] & (torch.arange(N, device=device)[None] < prefix_len[:, None]))
    segment_of = torch.cat([torch.full((s.length,), i, device=device) for i, s in enumerate(segments)])
    if cond_drop_prob > 0:
        dropped = _whole_segments(cond_drop_prob, segment_of, len(segments), B, generator)
        masked |= dropped & ~known
        counted = counted & ~dropped
    if cond_keep_prob > 0:
        kept = _whole_segments(cond_keep_prob, segment_of, len(segments), B, generator)
        masked &= ~kept
        counted = counted & ~kept
    return masked, counted


def _loss_weight(schedule: NoiseSchedule, t: torch.Tensor, snr_cap: float | None) -> torch.Tensor:
    """dsigma / expm1(sigma) at `t`, softly capped at `snr_cap` (w * cap / (w + cap)) when set."""
    weight = schedule.loss_weight(t)
    if snr_cap is not None:
        weight = weight * snr_cap / (weight + snr_cap)
    return weight


def _segment_sums(logprobs: Any, x0: torch.Tensor, segments: Sequence[Segment], scored: torch.Tensor,
                  weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per segment, the sum of weight(t) * -log p(x0) over its `scored` positions (masked and counted)."""
    sums = {}
    for seg in segments:
        sl = slice(seg.start, seg.stop)
        lp = logprobs.get(seg.name) if isinstance(logprobs, Mapping) else None
        if lp is None or lp.shape[:2] != (x0.shape[0], seg.length) or lp.shape[2] != seg.vocab_size:
            got = list(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
            raise ValueError(
                f"denoiser: expected log-probs {[x0.shape[0], seg.length, seg.vocab_size]} for segment "
                f"{seg.name!r}, got {got}"
            )
        nll = -lp.float().gather(-1, (x0[:, sl] - seg.vocab_start)[..., None]).squeeze(-1)
        # where(), not a product: a masked-out position may hold -inf log-probs (0 * inf = nan).
        sums[seg.name] = torch.where(scored[:, sl], nll * weight[:, None], 0.0).sum()
    return sums


def _reduce(sums: dict[str, torch.Tensor], weights: dict[str, float], segments: Sequence[Segment],
            masked: torch.Tensor, counted: torch.Tensor, t: torch.Tensor) -> LossOutput:
    """loss = sum_s weight_s * S_s / sum_s N_s (`diffusion_loss`'s averaging), with the per-modality
    losses and counts to log."""
    total = counted.new_zeros((), dtype=torch.float32)
    per_modality = {}
    for seg in segments:
        total = total + weights[seg.name] * sums[seg.name]
        per_modality[seg.name] = (sums[seg.name] / counted[:, seg.start : seg.stop].sum().clamp(min=1)).detach()
    num_tokens = counted.sum()
    return LossOutput(loss=total / num_tokens.clamp(min=1), per_modality=per_modality, num_tokens=num_tokens,
                      num_masked=(masked & counted).sum(), t=t)


def diffusion_loss(
    denoiser: Callable[..., Mapping[str, torch.Tensor]],
    x0: torch.LongTensor,
    segments: Sequence[Segment],
    mask_id: int,
    *,
    schedule: str | NoiseSchedule = "loglinear",
    known: torch.BoolTensor | None = None,
    hidden: torch.BoolTensor | None = None,
    loss_mask: torch.BoolTensor | None = None,
    keep_prefix_prob: float = 0.0,
    prefix_len: torch.Tensor | Sequence[int] | int | None = None,
    cond_drop_prob: float = 0.0,
    cond_keep_prob: float = 0.0,
    modality_weights: Mapping[str, float] | None = None,
    snr_cap: float | None = None,
    time_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    validate_tokens: bool = True,
) -> LossOutput:
    """Mask `x0` at random times and return the weighted masked-token cross-entropy.

    Args:
        denoiser: `denoiser(x, sigma, positions, **model_kwargs) -> {segment: log-probs [B, L, V]}`
            (docs/architecture.md); called once with `positions=None` (every position).
        x0: clean states `[B, N]` of backbone ids.
        segments, mask_id: `layout.segments`, `layout.mask_id`.
        known: positions that are never masked and never counted (e.g. fixed conditioning).
        hidden: positions always masked, never counted (a report-first pair's image, drawn later).
        loss_mask: positions that count (default all). medim-v1 passes "not padding"; the native
            layout supervises padding and end-of-report, so it passes None.
        keep_prefix_prob, prefix_len: with this probability per row, state positions
            `[0, prefix_len[r])` (the report's first sentence; the state starts with the text) stay
            unmasked. Release: 0.1.
        cond_drop_prob: with this probability per row, one whole segment (chosen uniformly) is
            masked and excluded from the loss, so the model learns the unconditional prediction of
            the other one (classifier-free guidance).
        cond_keep_prob: with this probability per row, one whole segment (chosen uniformly) stays
            clean and is not scored, so the row is a pure conditional task (text-to-image or
            image-to-report). Under one shared t a masked image mostly comes with a masked report,
            and a small model learns to copy from visible neighbours long before it learns to
            read the other modality; kept rows teach that directly (default 0: the release).
        modality_weights: multiplies each segment's summed loss (default 1).
        snr_cap: if set, the weight w = dsigma/expm1(sigma) becomes the soft minimum
            w * cap / (w + cap) (about min(w, cap)), which tames the 1/t blow-up near t = 0.
        time_eps: t is drawn in [time_eps, 1].
        validate_tokens: check that every id of `x0` lies in its segment's vocabulary. The check
            reads a flag back to the host (a sync on an accelerator); the trainer checks its
            batches on the host before they move and passes False.
        generator: makes t and every mask reproducible. Draw order: t [B]; mask uniforms [B, N];
            then [B] for prefix keeping if keep_prefix_prob > 0; then [B] and [B] for the dropout
            decision and the dropped segment if cond_drop_prob > 0; then [B] and [B] for the
            keeping decision and the kept segment if cond_keep_prob > 0. A row both dropped and
            kept keeps the one segment and drops the other (same segment: kept).

    Averaging: loss = sum_s weight_s * S_s / sum_s N_s, where S_s is the sum of w(t) * -log p(x0)
    over masked counted tokens of segment s and N_s the number of its counted tokens (masked or
    not). With unit weights this is the release's loss (masked NLL summed, divided by non-padding
    tokens), an unbiased estimate of the per-token negative ELBO.

    Example:
        >>> out = diffusion_loss(lambda x, s, p: model(x, s, positions=p).logprobs, x0,
        ...                      layout.segments, layout.mask_id, loss_mask=x0 != layout.pad_id)
        >>> out.loss.backward()
    """
    segments = _check_states(x0, segments, mask_id, validate_tokens)
    sched = get_schedule(schedule)
    known, hidden, counted = _position_masks(x0, known, hidden, loss_mask)
    _check_options(keep_prefix_prob=keep_prefix_prob, cond_drop_prob=cond_drop_prob, cond_keep_prob=cond_keep_prob,
                   time_eps=time_eps, snr_cap=snr_cap)
    weights = _modality_weights(segments, modality_weights)
    prefix_len = _prefix_lengths(prefix_len, keep_prefix_prob, x0.shape[0], x0.device)
    t = sample_times(x0.shape[0], eps=time_eps, generator=generator, device=x0.device)
    masked, counted = _mask(x0, t, known, counted, schedule=sched, segments=segments, generator=generator,
                            keep_prefix_prob=keep_prefix_prob, prefix_len=prefix_len,
                            cond_drop_prob=cond_drop_prob, cond_keep_prob=cond_keep_prob)
    logprobs = denoiser(torch.where(masked | hidden, mask_id, x0), sched.sigma(t), None, **(model_kwargs or {}))
    sums = _segment_sums(logprobs, x0, segments, masked & counted, _loss_weight(sched, t, snr_cap))
    return _reduce(sums, weights, segments, masked, counted, t)


def elbo_terms(
    denoiser: Callable[..., Mapping[str, torch.Tensor]],
    x0: torch.LongTensor,
    noised: torch.BoolTensor,
    counted: torch.BoolTensor,
    t: torch.Tensor,
    u: torch.Tensor,
    *,
    segments: Sequence[Segment],
    mask_id: int,
    schedule: str | NoiseSchedule = "loglinear",
    model_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """One Monte-Carlo draw of the negative ELBO per row, split by position (float32 [B, N]).

    Row b is noised at time t[b]: each position of `noised` is masked where u[b, n] is below the
    move chance; a masked position of `counted` (a subset of `noised`) contributes
    w(t) * -log p(x0 | x_t), everything else 0. Positions outside `noised` are given as they are
    in `x0` (the mask id there hides them from the model). With t uniform in [eps, 1] (e.g.
    `sample_times`) and u uniform in [0, 1), a row's sum averages to the negative ELBO of its
    counted tokens given the rest: minus a lower bound on their log-likelihood, in nats. The
    denoiser must return true log-probs; it is only asked for the segments that count, and only
    for the rows where something counted is masked (`model_kwargs` tensors are per row).

    Example:
        >>> t = sample_times(8, generator=g)
        >>> terms = elbo_terms(denoiser, x0.expand(8, -1), noised, noised, t, torch.rand(8, x0.shape[1]),
        ...                    segments=layout.segments, mask_id=layout.mask_id)
        >>> -terms.sum(1).mean()   # a lower bound on log p(counted tokens | the others)
    """
    sched = get_schedule(schedule)
    masked = noised & (u < sched.move_chance(t)[:, None])
    scored = masked & counted
    terms = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    # Rows with nothing scored masked (likely at small t) need no forward.
    rows = scored.any(1).nonzero()[:, 0]
    if not len(rows):
        return terms
    scored = scored[rows]
    wanted = [seg for seg in segments if bool(scored[:, seg.start : seg.stop].any())]
    xt = torch.where(masked[rows], mask_id, x0[rows])
    positions = {seg.name: torch.arange(seg.start, seg.stop, device=x0.device) for seg in wanted}
    kwargs = {k: v[rows] for k, v in (model_kwargs or {}).items()}
    logprobs = denoiser(xt, sched.sigma(t[rows]), positions, **kwargs)
    weight = sched.loss_weight(t[rows]).float()[:, None]
    for seg in wanted:
        sl = slice(seg.start, seg.stop)
        # Hidden or padding ids may lie outside the segment's vocabulary: gather a valid index there.
        index = torch.where(scored[:, sl], x0[rows, sl] - seg.vocab_start, 0)
        nll = -logprobs[seg.name].float().gather(-1, index[..., None]).squeeze(-1)
        terms[rows, sl] = torch.where(scored[:, sl], nll * weight, 0.0)
    return terms

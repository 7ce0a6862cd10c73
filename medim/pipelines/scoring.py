"""How well a report fits an image (`MeDiMPipeline.score`, `rank`): Monte-Carlo estimates of the
masked-diffusion ELBO, a lower bound on log p(report | image), log p(image | report), the joint or a
marginal, in nats (higher = better fit); and, for retrieval, the pointwise mutual information
log p(image | report) - log p(image) = log p(report | image) - log p(report).

Why PMI ranks. log p(report | image) mixes in each report's own prior (short, common reports score
higher for every image), so it ranks the images of one report but not the reports of one image;
log p(image | report) is skewed the other way. Subtracting the marginal, which the model gives with
the other modality hidden (it was trained so, with condition dropout), leaves a score that ranks
along both axes of one matrix. `rank` estimates it on the image side: the report side's tokens
move with the report's wording, the image codes stay on one grid.

Two estimators of the PMI. "one-step": the model's prediction of the whole image from the report
at t = 1 (every code masked), read as independent per-code distributions, so
PMI[i, j] = sum over codes c of log p(code_c(i) | report j) - log p(code_c(i)): one forward per
report and one unconditional forward, whatever the number of images (each encoded once, each
report once), and no randomness. "elbo": the bounds below, conditional minus marginal, with
`num_samples` shared time points per pair (n_images x n_reports x num_samples forwards).
docs/pipeline.md has the accuracy and cost of each.

The estimator is the training loss's (`medim.diffusion.loss.elbo_terms`): per time point t the
scored tokens are masked with the schedule's move chance and the model's -log p of each masked
token is weighted by dsigma / expm1(sigma) (1/t for the log-linear schedule); `num_samples` time
points per pair are stratified over [1e-3, 1] as in training. All pairs of one call share the same
time points and mask draws (common random numbers): a pair's score depends only on the pair and the
seed, not on the other pairs or the batching, and differences between the scores of one image's
reports carry less noise than the scores themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from medim.diffusion.loss import elbo_terms, sample_times
from medim.diffusion.schedule import get_schedule
from medim.layout import SequenceLayout
from medim.pipelines.common import Runtime, encode_images
from medim.utils.checks import check_choice, check_int

__all__ = ["ScoreOutput", "DIRECTIONS", "PAIR_DIRECTIONS", "RANK_DIRECTIONS", "ESTIMATORS", "NUM_SAMPLES",
           "check_options", "check_rank_options", "draws", "estimate_elbo", "pair_rows", "score", "one_step_pmi",
           "rank"]

# direction -> (segments whose tokens are scored, segment hidden from the model or None).
_ROLES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "report|image": (("text",), None),
    "image|report": (("image",), None),
    "joint": (("text", "image"), None),
    "report": (("text",), "image"),
    "image": (("image",), "text"),
}
DIRECTIONS = tuple(_ROLES)
PAIR_DIRECTIONS = ("report|image", "image|report", "joint")
RANK_DIRECTIONS = ("pmi", *PAIR_DIRECTIONS)  # "pmi": the calibrated default of `rank`
ESTIMATORS = ("one-step", "elbo")
NUM_SAMPLES = 16  # time points per pair by default (the spread this gives: docs/pipeline.md)
# At most this many: the mask draws of one group of pairs are held at once ([num_samples, state_len]),
# and past it the spread is far below any difference between reports (docs/pipeline.md).
MAX_NUM_SAMPLES = 4096
TIME_EPS = 1e-3  # times lie in [TIME_EPS, 1], as in training (diffusion_loss)
ROWS_PER_FORWARD = 256  # default batch_size: pair x time-point rows per model forward


@dataclass
class ScoreOutput:
    """What `score` returns, one entry per pair, in nats.

    Attributes:
        scores: [P] the estimated lower bound on the log-likelihood of the scored tokens (higher =
            better fit).
        per_token: [P] `scores / num_tokens`.
        num_tokens: [P] scored tokens that are not padding (native layout: the report's tokens and
            its end mark; its padding is scored too, as the model's guess of the report's length).
        token_scores: [P, state_len] each scored position's share of `scores` (0 elsewhere).
        stderr: [P] the spread of the `num_samples` terms / sqrt(num_samples), a standard error
            of `scores` across seeds (docs/pipeline.md); nan for one sample.
        nfe: model forwards spent.
    """

    scores: torch.Tensor
    per_token: torch.Tensor
    num_tokens: torch.LongTensor
    token_scores: torch.Tensor
    stderr: torch.Tensor
    nfe: int = 0


def check_options(direction: Any, num_samples: Any, batch_size: Any, generator: Any, allowed: Sequence[str]) -> None:
    """The options `score` and `rank` share (`allowed`: the directions the method takes)."""
    check_choice(direction, "direction", allowed)
    check_int(num_samples, "num_samples", minimum=1, maximum=MAX_NUM_SAMPLES)
    check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or one torch.Generator (all pairs share its draws), "
                        f"got {type(generator).__name__}")


def check_rank_options(direction: Any, estimator: Any, num_samples: Any, batch_size: Any, generator: Any) -> str:
    """`rank`'s options; returns the estimator (None: "one-step" for "pmi", else "elbo")."""
    check_options(direction, num_samples, batch_size, generator, RANK_DIRECTIONS)
    if estimator is None:
        return "one-step" if direction == "pmi" else "elbo"
    check_choice(estimator, "estimator", ESTIMATORS)
    if estimator == "one-step" and direction != "pmi":
        raise ValueError(f"estimator='one-step' estimates direction 'pmi' only, got direction={direction!r}: "
                         "the raw bounds use estimator='elbo'")
    return estimator


def draws(num_samples: int, state_len: int, generator: torch.Generator | None, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The time points [K] (stratified) and the mask uniforms [K, state_len] of one group of pairs."""
    t = sample_times(num_samples, eps=TIME_EPS, generator=generator, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return t, torch.rand((num_samples, state_len), generator=generator, device=gen_device).to(device)


Rows = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def estimate_elbo(rt: Runtime, rows: Rows, *, t: torch.Tensor, u: torch.Tensor, group: torch.Tensor,
                  batch_size: int | None, keep_tokens: bool = True, desc: str = "MeDiM score") -> ScoreOutput:
    """The Monte-Carlo estimate for the pairs of `group` [P]. `rows(pair_index [R])` returns their
    `(x0, noised, counted, condition)`; pair p uses the time points `t[group[p]]` [K] and mask
    uniforms `u[group[p]]` [K, N]. Runs `batch_size` pair x time-point rows per forward (None:
    `ROWS_PER_FORWARD`); `keep_tokens=False` skips the per-position shares; `desc` labels the
    progress bar (the task the user called)."""
    num_pairs, K = len(group), t.shape[1]
    layout, device = rt.layout, rt.device
    schedule = rt.sampler_config.noise_schedule
    totals = torch.zeros(num_pairs * K, dtype=torch.float64, device=device)
    token_sum = torch.zeros(num_pairs, layout.state_len, dtype=torch.float64, device=device) if keep_tokens else None
    num_tokens = torch.zeros(num_pairs, dtype=torch.long, device=device)
    nfe = 0

    def denoiser(x, sigma, positions, **kwargs):
        nonlocal nfe
        nfe += 1
        return rt.model(x, sigma, positions=positions, **kwargs).logprobs

    size = batch_size or ROWS_PER_FORWARD
    bar = tqdm(total=num_pairs * K, desc=desc, unit="draw", **rt.progress)
    with torch.inference_mode(), bar:
        for start in range(0, num_pairs * K, size):
            r = torch.arange(start, min(start + size, num_pairs * K), device=device)
            pair, k = r // K, r % K
            x0, noised, counted, condition = rows(pair)
            g = group[pair]
            terms = elbo_terms(denoiser, x0, noised, counted, t[g, k], u[g, k], segments=layout.segments,
                               mask_id=layout.mask_id, schedule=schedule, model_kwargs=condition)
            totals[r] = terms.sum(-1, dtype=torch.float64)
            if token_sum is not None:
                token_sum.index_add_(0, pair, terms.double())
            first = k == 0  # count each pair's tokens once
            num_tokens[pair[first]] = (counted[first] & _not_padding(layout, x0[first])).sum(-1)
            bar.update(len(r))
    totals = totals.view(num_pairs, K)
    scores = -totals.mean(1)
    stderr = totals.std(1) / math.sqrt(K) if K > 1 else torch.full_like(scores, math.nan)
    token_scores = -token_sum / K if token_sum is not None else torch.empty(0)
    return ScoreOutput(scores.float(), (scores / num_tokens.clamp(min=1)).float(), num_tokens,
                       token_scores.float(), stderr.float(), nfe)


def _not_padding(layout: SequenceLayout, x0: torch.Tensor) -> torch.Tensor:
    keep = torch.ones_like(x0, dtype=torch.bool)
    keep[:, : layout.text_len] = x0[:, : layout.text_len] != layout.pad_id
    return keep


def pair_rows(layout: SequenceLayout, direction: str, report_ids: torch.Tensor | None, codes: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x0, noised, counted)` [B, N] of pairs: report ids [B, text_len] and image codes
    [B, image_len] (None for a hidden modality) scored as `direction` says."""
    scored, _ = _ROLES[direction]
    text, image = layout.text_segment, layout.image_segment
    rows = (report_ids if report_ids is not None else codes).shape[0]
    device = (report_ids if report_ids is not None else codes).device
    x0 = torch.full((rows, layout.state_len), layout.mask_id, dtype=torch.long, device=device)
    if report_ids is not None:
        x0[:, text.start : text.stop] = report_ids
    if codes is not None:
        x0[:, image.start : image.stop] = codes + image.vocab_start
    noised = torch.zeros_like(x0, dtype=torch.bool)
    for seg in (text, image):
        if seg.name in scored:
            noised[:, seg.start : seg.stop] = True
    counted = noised.clone()
    if not layout.supervise_padding:  # medim-v1: padding is masked as in training but never scored
        counted[:, text.start : text.stop] &= x0[:, text.start : text.stop] != layout.pad_id
    return x0, noised, counted


def score(rt: Runtime, rgb: list[Image.Image] | None, reports: list[str] | None, *, direction: str, num_samples: int,
          batch_size: int | None, generator: torch.Generator | None, image_size: tuple[int, int]) -> ScoreOutput:
    """Pair i is `rgb[i]` with `reports[i]` (None: the modality `direction` leaves out; without
    images, `image_size` is every row's size condition)."""
    count = len(rgb) if rgb is not None else len(reports)
    sizes, codes = [image_size] * count, None
    if rgb is not None:
        _, sizes, codes = encode_images(rt, rgb)
    report_ids = rt.layout.encode_reports(rt.tokenizer, reports).to(rt.device) if reports else None
    x0, noised, counted = pair_rows(rt.layout, direction, report_ids, codes)
    condition = {k: v.to(rt.device) for k, v in rt.layout.condition(rt.tokenizer, sizes).items()}
    t, u = draws(num_samples, rt.layout.state_len, generator, rt.device)

    def rows(pair: torch.Tensor):
        return x0[pair], noised[pair], counted[pair], {k: v[pair] for k, v in condition.items()}

    group = torch.zeros(count, dtype=torch.long, device=rt.device)
    return estimate_elbo(rt, rows, t=t[None], u=u[None], group=group, batch_size=batch_size)


def one_step(rt: Runtime, states: torch.Tensor, condition: dict[str, torch.Tensor], batch_size: int | None,
             reduce: Callable[[torch.Tensor, slice], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The model's one-step image prediction for `states` [R, N] (the masked codes as the first
    sampling step sees them, at t = 1), `batch_size` rows a forward (None: `ROWS_PER_FORWARD`),
    each batch's image log-probs [b, image_len, V] turned by `reduce(logprobs, rows)` into its
    part of the result (so the full log-probs are never held at once); returns the parts
    concatenated and the forwards spent."""
    image = rt.layout.image_segment
    sigma = get_schedule(rt.sampler_config.noise_schedule).sigma(torch.ones(1, device=rt.device))
    positions = {"image": torch.arange(image.start, image.stop, device=rt.device)}
    size = batch_size or ROWS_PER_FORWARD
    parts = []
    with torch.inference_mode():
        for start in range(0, len(states), size):
            rows = slice(start, start + size)
            out = rt.model(states[rows], sigma.expand(len(states[rows])), positions=positions,
                           **{k: v[rows] for k, v in condition.items()})
            parts.append(reduce(out.logprobs["image"].float(), rows))
    return torch.cat(parts), len(parts)


def one_step_pmi(rt: Runtime, codes: torch.Tensor, report_ids: torch.Tensor, sizes: list[tuple[int, int]],
                 batch_size: int | None) -> tuple[torch.Tensor, int]:
    """The one-step PMI [len(codes), len(report_ids)] (module docstring) and the forwards spent:
    per image size (the medim-v1 condition; one for the native layout), the image wholly masked
    under each report, and once with the report hidden too."""
    layout, device = rt.layout, rt.device
    text = layout.text_segment
    states = torch.full((len(report_ids) + 1, layout.state_len), layout.mask_id, dtype=torch.long, device=device)
    states[:-1, text.start : text.stop] = report_ids  # the last row: nothing known (the marginal)
    pmi = torch.empty(len(codes), len(report_ids), device=device)
    nfe, where = 0, torch.arange(codes.shape[1], device=device)
    for shape in dict.fromkeys(sizes):
        images = torch.tensor([s == shape for s in sizes], device=device)
        mine = codes[images]
        condition = {k: v.to(device) for k, v in layout.condition(rt.tokenizer, [shape] * len(states)).items()}
        # [b, I, image_len] log-probs of every image's codes under each row, summed over the codes
        log_p, spent = one_step(rt, states, condition, batch_size,
                                lambda lp, rows, mine=mine: lp[:, where, mine].sum(-1))
        pmi[images] = (log_p[:-1] - log_p[-1:]).T
        nfe += spent
    return pmi, nfe


def rank(rt: Runtime, rgb: list[Image.Image], reports: list[str], *, direction: str, estimator: str,
         num_samples: int, batch_size: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """The scores of every image with every report, [len(rgb), len(reports)]: the PMI ("pmi", by
    `estimator`) or the bounds of a pair direction."""
    _, sizes, codes = encode_images(rt, rgb)
    report_ids = rt.layout.encode_reports(rt.tokenizer, reports).to(rt.device)
    if estimator == "one-step":
        return one_step_pmi(rt, codes, report_ids, sizes, batch_size)[0]
    condition = {k: v.to(rt.device) for k, v in rt.layout.condition(rt.tokenizer, sizes).items()}
    t, u = draws(num_samples, rt.layout.state_len, generator, rt.device)
    n_reports = len(reports)
    pairs = "image|report" if direction == "pmi" else direction

    def rows(pair: torch.Tensor):
        i, j = pair // n_reports, pair % n_reports
        x0, noised, counted = pair_rows(rt.layout, pairs, report_ids[j], codes[i])
        return x0, noised, counted, {k: v[i] for k, v in condition.items()}

    def bounds(rows: Rows, count: int) -> torch.Tensor:  # every row shares the draws t, u
        group = torch.zeros(count, dtype=torch.long, device=rt.device)
        return estimate_elbo(rt, rows, t=t[None], u=u[None], group=group, batch_size=batch_size,
                             keep_tokens=False, desc="MeDiM rank").scores

    matrix = bounds(rows, len(rgb) * n_reports).view(len(rgb), n_reports)
    if direction != "pmi":
        return matrix
    x0, noised, counted = pair_rows(rt.layout, "image", None, codes)  # the marginal: the report hidden
    marginal = bounds(lambda i: (x0[i], noised[i], counted[i], {k: v[i] for k, v in condition.items()}), len(rgb))
    return matrix - marginal[:, None]

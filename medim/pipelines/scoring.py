"""How well a report fits an image (`ScoringMixin`: score, rank): Monte-Carlo estimates of the
masked-diffusion ELBO, a lower bound on log p(report | image), log p(image | report), the joint or a
marginal, in nats (higher = better fit).

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
from tqdm.auto import tqdm

from medim.data.images import ImageInput
from medim.diffusion.loss import elbo_terms, sample_times
from medim.pipelines.generation import check_image_size, check_prompts, encode_images, image_list

__all__ = ["ScoreOutput", "ScoringMixin", "DIRECTIONS", "NUM_SAMPLES", "estimate_elbo"]

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
NUM_SAMPLES = 16  # time points per pair by default (the variance this gives: ScoringMixin.score)
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
            (on the demo it matches the spread across seeds); nan for one sample.
        nfe: model forwards spent.
    """

    scores: torch.Tensor
    per_token: torch.Tensor
    num_tokens: torch.LongTensor
    token_scores: torch.Tensor
    stderr: torch.Tensor
    nfe: int = 0


def _check_options(direction: Any, num_samples: Any, batch_size: Any, generator: Any, allowed: Sequence[str]) -> None:
    if direction not in allowed:
        raise ValueError(f"direction must be one of {list(allowed)}, got {direction!r}")
    if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and not isinstance(batch_size, bool)
                                       and batch_size >= 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or one torch.Generator (all pairs share its draws), "
                        f"got {type(generator).__name__}")


def draws(num_samples: int, state_len: int, generator: torch.Generator | None, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The time points [K] (stratified) and the mask uniforms [K, state_len] of one group of pairs."""
    t = sample_times(num_samples, eps=TIME_EPS, generator=generator, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return t, torch.rand((num_samples, state_len), generator=generator, device=gen_device).to(device)


Rows = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def estimate_elbo(pipe: Any, rows: Rows, num_pairs: int, t: torch.Tensor, u: torch.Tensor, group: torch.Tensor,
                  batch_size: int | None, keep_tokens: bool = True) -> ScoreOutput:
    """The Monte-Carlo estimate for `num_pairs` pairs. `rows(pair_index [R])` returns their
    `(x0, noised, counted, condition)`; pair p uses the time points `t[group[p]]` [K] and mask
    uniforms `u[group[p]]` [K, N]. Runs `batch_size` pair x time-point rows per forward."""
    K = t.shape[1]
    layout, device = pipe.layout, pipe.device
    schedule = pipe.sampler_config.noise_schedule
    totals = torch.zeros(num_pairs * K, dtype=torch.float64, device=device)
    token_sum = torch.zeros(num_pairs, layout.state_len, dtype=torch.float64, device=device) if keep_tokens else None
    num_tokens = torch.zeros(num_pairs, dtype=torch.long, device=device)
    nfe = 0

    def denoiser(x, sigma, positions, **kwargs):
        nonlocal nfe
        nfe += 1
        return pipe.model(x, sigma, positions=positions, **kwargs).logprobs

    size = batch_size or ROWS_PER_FORWARD
    bar = tqdm(total=num_pairs * K, desc="MeDiM score", unit="draw", **pipe._progress_bar_config)
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


def _not_padding(layout: Any, x0: torch.Tensor) -> torch.Tensor:
    keep = torch.ones_like(x0, dtype=torch.bool)
    keep[:, : layout.text_len] = x0[:, : layout.text_len] != layout.pad_id
    return keep


def pair_rows(layout: Any, direction: str, report_ids: torch.Tensor | None, codes: torch.Tensor | None
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


class ScoringMixin:
    """Likelihood-based scoring and retrieval for `MeDiMPipeline` (which provides model, vqgan,
    tokenizer, layout, sampler_config, image_resolution and device)."""

    def score(
        self,
        images: ImageInput | Sequence[ImageInput] | None,
        reports: Sequence[str] | None,
        *,
        direction: str = "report|image",
        num_samples: int = NUM_SAMPLES,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        image_size: tuple[int, int] = (512, 512),
    ) -> ScoreOutput:
        """Score image-report pairs: `images[i]` with `reports[i]`.

        Args:
            images, reports: equally long lists (PIL images, paths, arrays or tensors; str).
            direction: "report|image" (log p(report | image): the image known, the report's
                tokens masked at each time point), "image|report", "joint" (both masked at the
                same rate), or a marginal: "report" (pass `images=None`; the image hidden) or
                "image" (pass `reports=None`).
            num_samples: time points per pair (stratified over [1e-3, 1]).
            batch_size: pair x time-point rows per model forward (default 256).
            generator: one generator; the same seed gives the same numbers, whatever the batching.
            image_size: the medim-v1 size condition when `images` is None.

        Returns a `ScoreOutput`: per pair the bound in nats (`scores`, higher = better fit), per
        token, per position, and a standard error. The estimator's spread, measured on the demo
        (30 held-out pairs, "report|image", 20 seeds; `benchmarks/bench_editing.py --only spread
        --spread-n 30 --spread-seeds 20`): at the default `num_samples=16` one score's standard
        deviation across seeds is 2.4 nats (0.13 nats per token) for scores around -8 nats; 4.1
        at 4 and 1.2 at 64, so about 1 / sqrt(num_samples); `stderr` estimates it (2.2 at 16).
        The pairs of one call share their draws, so their differences vary far less: enough to
        rank 100 reports at 16 (docs/pipeline.md, "Editing and scoring").

        Example:
            >>> out = pipe.score(["phantom.png"], ["A large dense nodule in the right upper zone."],
            ...                  generator=torch.Generator().manual_seed(0))
            >>> out.scores, out.per_token
        """
        _check_options(direction, num_samples, batch_size, generator, DIRECTIONS)
        uses_images, uses_reports = direction != "report", direction != "image"
        for name, value, used in (("images", images, uses_images), ("reports", reports, uses_reports)):
            if not used and value is not None:
                raise ValueError(f"direction {direction!r} leaves {name} out: pass {name}=None")
            if used and value is None:
                raise ValueError(f"direction {direction!r} needs {name}")
        reports = check_prompts(reports, "reports") if uses_reports else None
        rgb = image_list(images) if uses_images else None
        if rgb is not None and reports is not None and len(rgb) != len(reports):
            raise ValueError(f"images and reports must pair up one to one, got {len(rgb)} images and "
                             f"{len(reports)} reports")
        count = len(rgb) if rgb is not None else len(reports)
        sizes = [check_image_size(image_size)] * count
        codes = None
        if rgb is not None:
            _, sizes, codes = encode_images(self, rgb)
        report_ids = self.layout.encode_reports(self.tokenizer, reports).to(self.device) if reports else None
        x0, noised, counted = pair_rows(self.layout, direction, report_ids, codes)
        condition = {k: v.to(self.device) for k, v in self.layout.condition(self.tokenizer, sizes).items()}
        t, u = draws(num_samples, self.layout.state_len, generator, self.device)

        def rows(pair: torch.Tensor):
            return x0[pair], noised[pair], counted[pair], {k: v[pair] for k, v in condition.items()}

        group = torch.zeros(count, dtype=torch.long, device=self.device)
        return estimate_elbo(self, rows, count, t[None], u[None], group, batch_size)

    def rank(
        self,
        images: Sequence[ImageInput],
        reports: Sequence[str],
        *,
        direction: str = "report|image",
        num_samples: int = NUM_SAMPLES,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Score every image with every report, for retrieval: returns the float32 matrix
        [len(images), len(reports)] of bounds in nats (higher = better fit; `direction` as for
        `score`: "report|image", "image|report" or "joint"). Entry [i, j] equals
        `score([images[i]], [reports[j]], ...)` with the same generator seed. Rank the reports of
        image i with `matrix[i].argsort(descending=True)`, the images of report j with
        `matrix[:, j]`. Costs len(images) x len(reports) x num_samples rows of forwards.

        Example:
            >>> matrix = pipe.rank(images, reports, generator=torch.Generator().manual_seed(0))
            >>> best_report = matrix.argmax(1)
        """
        _check_options(direction, num_samples, batch_size, generator, PAIR_DIRECTIONS)
        reports = check_prompts(reports, "reports")
        rgb = image_list(images)
        _, sizes, codes = encode_images(self, rgb)
        report_ids = self.layout.encode_reports(self.tokenizer, reports).to(self.device)
        condition = {k: v.to(self.device) for k, v in self.layout.condition(self.tokenizer, sizes).items()}
        t, u = draws(num_samples, self.layout.state_len, generator, self.device)
        n_reports = len(reports)

        def rows(pair: torch.Tensor):
            i, j = pair // n_reports, pair % n_reports
            x0, noised, counted = pair_rows(self.layout, direction, report_ids[j], codes[i])
            return x0, noised, counted, {k: v[i] for k, v in condition.items()}

        count = len(rgb) * n_reports
        group = torch.zeros(count, dtype=torch.long, device=self.device)
        out = estimate_elbo(self, rows, count, t[None], u[None], group, batch_size, keep_tokens=False)
        return out.scores.view(len(rgb), n_reports)

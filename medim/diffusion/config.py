"""SamplerConfig: every setting of the sampling loop in one frozen, validated object.

A pipeline stores one in model_index.json ("sampler") as its defaults; a call overrides some of
them with `config.replace(...)`. Every value is checked once, when the object is made, so the
sampling loop never re-checks its settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from medim.utils.checks import check_choice, check_int, check_number

from .schedule import SCHEDULES, NoiseSchedule, get_schedule

__all__ = ["SamplerConfig", "RELEASE_SAMPLER", "FAST_OPTIONS", "STRATEGIES", "COMMIT_SCHEDULES", "GUIDANCE_SCHEDULES",
           "ORDERS", "MAX_STEPS"]

STRATEGIES = ("maskgit", "threshold", "ddpm")
COMMIT_SCHEDULES = ("arccos", "cosine", "linear", "cosine_ratio")
GUIDANCE_SCHEDULES = ("constant", "linear")
ORDERS = ("confidence", "halton", "text_first")
# More steps than any state has positions can never commit anything new (maskgit and threshold
# commit at least one token per step), and the per-step tables grow with the count: a typo such
# as 10**9 would allocate gigabytes before the first forward.
MAX_STEPS = 65536


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplerConfig:
    """Settings of `medim.diffusion.sample`.

    Attributes:
        num_inference_steps: denoising steps, at most `MAX_STEPS` (a guided step is one batched forward).
        strategy: "maskgit" (commit the most confident tokens, `schedule` says how many per
            step), "threshold" (commit every token whose probability exceeds `threshold`, at
            least `min_per_step`; stops early when done) or "ddpm" (MDLM ancestral update).
        schedule: maskgit's commit-count schedule: "arccos" (release), "cosine", "linear" (these three
            share the release's normalisation, whose first step commits a single token), or
            "cosine_ratio" (MaskGIT's mask ratio: cos(pi/2 * i/S) of the tokens stay masked after step
            i of S, so the first of 4 steps commits about 8 %: a step not spent on one token).
        noise_schedule: the schedule giving the sigma fed to the model (a name of
            `medim.diffusion.SCHEDULES`, a `NoiseSchedule`, or a mapping `{"name": ..., **options}`
            as model_index.json stores it, made into its schedule).
        confidence_temperature: maskgit's Gumbel noise on the confidence, times t (release 10).
        threshold, min_per_step: the threshold strategy's settings.
        guidance_scale: classifier-free guidance weight w (0 = off); `guidance_schedule`
            "linear" ramps it as w * (1 - t) (release), "constant" keeps it.
        temperature, top_k, top_p: applied to the float32 log-probs (temperature 0 = greedy).
        time_eps: the last time of the grid linspace(1, time_eps, num_inference_steps + 1).
        order: maskgit's commit order for image tokens: "confidence" (release: the most confident
            tokens of the whole state) or "halton" (image tokens in a low-discrepancy spatial order
            over the square grid, text by confidence; each modality gets its own commit counts) or
            "text_first" (a state where both the report and the image are unknown, as a pair's,
            writes the report in the first round(text_share * steps) steps with the image hidden,
            then draws the image given it; each phase has its own time grid and commit counts, and
            asks the network for its own modality only. Other tasks sample as with "confidence").
        text_share: with order="text_first", the share of the steps that write the report (each
            phase gets at least one step; a 1-step call samples both at once).
        cache_interval: context caching (approximate; needs a denoiser with a `cached` method, as
            the pipeline's). None: off, every step runs the whole sequence. k >= 1: refresh the
            cached keys/values every k steps (and early, see docs/sampling.md); between refreshes
            only the still-masked positions run through the network. 1 gives the uncached tokens.

    Example:
        >>> config = SamplerConfig(num_inference_steps=64, guidance_scale=5.0)
        >>> config.replace(strategy="threshold").strategy
        'threshold'
    """

    num_inference_steps: int = 128
    strategy: str = "maskgit"
    schedule: str = "arccos"
    noise_schedule: str | NoiseSchedule | Mapping[str, Any] = "loglinear"
    confidence_temperature: float = 10.0
    threshold: float = 0.9
    min_per_step: int = 1
    guidance_scale: float = 0.0
    guidance_schedule: str = "linear"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    time_eps: float = 1e-5
    order: str = "confidence"
    text_share: float = 0.75
    cache_interval: int | None = None

    def __post_init__(self) -> None:
        check_int(self.num_inference_steps, "num_inference_steps", minimum=1, maximum=MAX_STEPS)
        for name, accepted in (("strategy", STRATEGIES), ("schedule", COMMIT_SCHEDULES),
                               ("guidance_schedule", GUIDANCE_SCHEDULES), ("order", ORDERS)):
            check_choice(getattr(self, name), name, accepted)
        if isinstance(self.noise_schedule, Mapping):  # as model_index.json stores it: {"name": ..., **options}
            params = dict(self.noise_schedule)
            try:
                object.__setattr__(self, "noise_schedule", get_schedule(params.pop("name", None), **params))
            except (TypeError, ValueError) as e:
                raise ValueError(f"noise_schedule: {e}") from None
        if not isinstance(self.noise_schedule, NoiseSchedule) and (not isinstance(self.noise_schedule, str)
                                                                   or self.noise_schedule not in SCHEDULES):
            raise ValueError(f"noise_schedule must be one of {sorted(SCHEDULES)} or a NoiseSchedule, "
                             f"got {self.noise_schedule!r}")
        for name in ("guidance_scale", "confidence_temperature", "temperature"):
            check_number(getattr(self, name), name, minimum=0)
        if not (_number(self.threshold) and 0 < self.threshold <= 1):
            raise ValueError(f"threshold must be a probability in (0, 1], got {self.threshold!r}")
        check_int(self.min_per_step, "min_per_step", minimum=1)
        check_int(self.top_k, "top_k", minimum=1, allow_none=True)
        if self.top_p is not None and not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if not (_number(self.time_eps) and 0 < self.time_eps < 1):
            raise ValueError(f"time_eps must be a number in (0, 1), got {self.time_eps!r}")
        check_int(self.cache_interval, "cache_interval", minimum=1, maximum=MAX_STEPS, allow_none=True)
        if not (_number(self.text_share) and 0 < self.text_share < 1):
            raise ValueError(f"text_share must be a number in (0, 1), got {self.text_share!r}")
        if self.order != "confidence" and self.strategy != "maskgit":  # the others commit by their own rule
            raise ValueError(f"order={self.order!r} is a maskgit commit order; strategy={self.strategy!r} does not "
                             "use it: set order='confidence' (the default) or strategy='maskgit'")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> SamplerConfig:
        """A copy with `changes` applied (and validated); unknown names raise ValueError."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown sampler options {unknown}; accepted: {list(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what model_index.json stores); `from_dict` inverts it."""
        d = dataclasses.asdict(self)
        if isinstance(self.noise_schedule, NoiseSchedule):
            names = [name for name, cls in SCHEDULES.items() if type(self.noise_schedule) is cls]
            if not names:
                raise ValueError(f"noise_schedule {self.noise_schedule!r} is not a registered schedule; "
                                 "it cannot be saved")
            d["noise_schedule"] = {"name": names[0], **dataclasses.asdict(self.noise_schedule)}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplerConfig:
        """Build from `to_dict()` output (or any subset of the fields: the rest keep their defaults)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"sampler settings must be a mapping of option names, got {type(d).__name__}")
        return cls().replace(**d)  # a noise_schedule mapping becomes its schedule in __post_init__


# The released MeDiM's sampler: MaskGIT with the arccos commit schedule, 128 steps, confidence
# temperature 10 and classifier-free guidance 5 ramped as 5 * (1 - t).
RELEASE_SAMPLER = SamplerConfig(guidance_scale=5.0)
# The `fast` preset: options applied over a pipeline's own settings (a model keeps its guidance and
# confidence noise), e.g. `pipe.text_to_image(prompts, **FAST_OPTIONS)`. A quarter of
# the release's steps on the cosine schedule, with context caching refreshed every 4 steps; measured
# on the demo in docs/sampling.md ("Presets"): quality, and its cost against the release's settings.
FAST_OPTIONS: Mapping[str, Any] = MappingProxyType({"num_inference_steps": 32, "schedule": "cosine",
                                                    "cache_interval": 4})

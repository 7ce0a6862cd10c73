"""Discrete (masked) diffusion core: noise schedules, the training loss, the sampler, task masks.

Everything here works with any denoiser callable (docs/architecture.md) and knows nothing of the
backbone or the layout beyond `layout.segments` and `layout.mask_id`.
"""

from .config import (
    COMMIT_SCHEDULES,
    FAST_OPTIONS,
    GUIDANCE_SCHEDULES,
    ORDERS,
    RELEASE_SAMPLER,
    STRATEGIES,
    SamplerConfig,
)
from .loss import LossOutput, diffusion_loss, sample_times
from .sampler import RolloutOutput, SampleOutput, commit_counts, masked_before, rollout, sample
from .schedule import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    NoiseSchedule,
    get_schedule,
)
from .segments import Segment
from .tasks import (
    TaskInputs,
    image_to_report,
    inpainting,
    pair_from_prompt,
    text_to_image,
    unconditional,
)

__all__ = [
    "COMMIT_SCHEDULES",
    "GUIDANCE_SCHEDULES",
    "SCHEDULES",
    "STRATEGIES",
    "CosineSchedule",
    "FAST_OPTIONS",
    "LinearSchedule",
    "LogLinearSchedule",
    "LossOutput",
    "NoiseSchedule",
    "ORDERS",
    "RELEASE_SAMPLER",
    "RolloutOutput",
    "SampleOutput",
    "SamplerConfig",
    "Segment",
    "TaskInputs",
    "commit_counts",
    "diffusion_loss",
    "get_schedule",
    "image_to_report",
    "inpainting",
    "masked_before",
    "pair_from_prompt",
    "rollout",
    "sample",
    "sample_times",
    "text_to_image",
    "unconditional",
]

"""The demo's fixed facts (name, sizes, sampler settings, prompts, held-out seed) and its build recipe.

Torch-free, so the command line reads the defaults without loading the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_NAME = "medim-demo"
IMAGE_SIZE = 64  # phantom side in pixels; the VQGAN turns it into an 8 x 8 grid of codes
TEXT_LEN = 40  # report slots: the longest phantom report is about 35 tokens with its end mark
# Sampler settings saved with the demo, chosen on held-out phantoms (docs/demo.md, "What moved the
# numbers"): 64 image codes need far fewer steps than 1024; this small model reads best unguided; a
# low confidence noise orders commits by confidence, but at 0 every generated pair collapses to "no
# lesion", while 3 keeps about the data's share of lesions. The cosine schedule at 32 steps is the
# cheapest point of the sampler map (benchmarks/bench_quality.py) within 0.5 points of the best on
# all three accuracies.
DEMO_SAMPLER = {"num_inference_steps": 32, "schedule": "cosine", "guidance_scale": 0.0, "confidence_temperature": 3.0}
# Held-out phantoms are drawn with this seed; training uses `BuildSettings.seed` (0), never this one.
EVAL_SEED = 10_000
# Prompts of unconditional pairs: the openers of the training reports.
PAIR_PROMPTS = ("Frontal view of the chest.", "Frontal chest radiograph.")
# Text-to-image prompts of `medim demo`, phrased like the training reports (their words, findings
# in reading order): the tiny model knows no other wording.
DEMO_PROMPTS = (
    "A large dense nodule in the right upper zone.",
    "A small lucent lesion in the left lower zone.",
    "No focal lesion.",
    "The right lower zone shows a small bright focus. A large dark nodule in the left upper zone.",
)


def demo_path() -> Path:
    """The folder of the shipped demo pipeline (package data; empty in a build without it)."""
    from medim.utils.hub import BUNDLED_MODELS

    return Path(__file__).resolve().parents[1] / BUNDLED_MODELS[DEMO_NAME]


@dataclass
class BuildSettings:
    """Everything `build_demo` trains with (saved next to the model as build.json).

    The defaults are the shipped model's recipe, sized for a 2-core CPU (build times and what fewer
    steps cost: docs/demo.md, "Retraining it"). Cut `model_steps` only for smoke runs; on a GPU
    raise `batch_size` instead.

    Example:
        >>> BuildSettings(num_train=2000, vqgan_steps=300, model_steps=500)
    """

    seed: int = 0
    num_train: int = 100_000  # phantom pairs in the token cache
    vqgan_steps: int = 600
    vqgan_batch_size: int = 16
    vqgan_codes: int = 128
    model_steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    hidden: int = 128
    layers: int = 4
    cond_drop_prob: float = 0.1  # for classifier-free guidance
    cond_keep_prob: float = 0.5  # pure conditional rows: see medim.diffusion.diffusion_loss
    rope_theta: float = 10_000.0  # the backbone's RoPE base

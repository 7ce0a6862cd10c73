"""Sample diversity: the mean pairwise MS-SSIM among generated images (pytorch-msssim's), as
image-generation benchmarks report beside FID. 1 means identical images, so a model that collapses
to one image scores near 1; lower is more diverse.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from medim.data.images import load_image
from medim.evaluation.fid import load_images
from medim.utils.checks import check_int

__all__ = ["DiversityResult", "ms_ssim_diversity"]


@dataclass
class DiversityResult:
    """What `ms_ssim_diversity` returns: the mean MS-SSIM over image pairs (lower = more diverse),
    its standard deviation, how many pairs and images, the side images were resized to."""

    ms_ssim: float
    std: float
    num_pairs: int
    num_images: int
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pytorch_msssim():
    try:
        import pytorch_msssim
    except ImportError as e:
        raise ImportError(
            "MS-SSIM needs the `pytorch-msssim` package: pip install 'medim-diffusion[clinical]'"
        ) from e
    return pytorch_msssim


def _pairs(n: int, max_pairs: int, seed: int) -> torch.Tensor:
    """Every pair i < j, or `max_pairs` of them drawn without replacement under `seed`."""
    pairs = torch.combinations(torch.arange(n), 2)
    if len(pairs) > max_pairs:
        pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        pairs = pairs[pick.sort().values]
    return pairs


def _as_uint8(image: Any, size: int) -> torch.Tensor:
    # Kept as uint8 (a quarter of float32's memory): every image of the set is held at once.
    pil = load_image(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)


@torch.no_grad()
def ms_ssim_diversity(
    images: str | os.PathLike | Sequence[Any],
    *,
    size: int = 256,
    max_pairs: int = 5000,
    batch_size: int = 50,
    seed: int = 0,
) -> DiversityResult:
    """Mean MS-SSIM over pairs of images: pytorch-msssim's `ms_ssim` with its defaults (5 scales,
    11-pixel Gaussian window) on RGB in [0, 1] (data range 1).

    Args:
        images: a folder of images or a list of paths / PIL images (converted to RGB as everywhere
            in medim; resized to `size` x `size` bilinearly unless already that size; MS-SSIM's 5
            scales need `size` > 160).
        size: the side every image is compared at (256: what MeDiM generates).
        max_pairs: all N(N-1)/2 pairs when there are fewer, else this many drawn under `seed`.
        batch_size: pairs per `ms_ssim` call.
        seed: which pairs are drawn when there are more than `max_pairs`.

    Example:
        >>> ms_ssim_diversity("out/images").ms_ssim  # doctest: +SKIP
    """
    check_int(size, "size", minimum=161)
    check_int(max_pairs, "max_pairs", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(seed, "seed", minimum=0)
    items = load_images(images)
    if len(items) < 2:
        raise ValueError(f"images needs at least 2 images for a pair, got {len(items)}")
    ms_ssim = _pytorch_msssim().ms_ssim
    stack = torch.stack([_as_uint8(item, size) for item in items])
    pairs = _pairs(len(items), max_pairs, seed)
    values = torch.cat([
        ms_ssim(stack[chunk[:, 0]].float() / 255, stack[chunk[:, 1]].float() / 255, data_range=1.0, size_average=False)
        for chunk in pairs.split(batch_size)
    ]).double()
    std = float(values.std()) if len(values) > 1 else 0.0
    return DiversityResult(float(values.mean()), std, len(pairs), len(items), size)

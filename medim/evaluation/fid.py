"""Frechet Inception Distance with pytorch-fid's defaults, offline; the same distance on RAD-DINO
features (`features="rad-dino"`).

The feature extractor is the FID Inception-v3 (TensorFlow's 2015-12-05 graph as ported by
pytorch-fid): input resized to 299x299 bilinearly, scaled from [0, 1] to [-1, 1], 2048-d pool3
features (the network is in `inception.py`). pytorch-fid's weights file
(`pt_inception-2015-12-05-6726825d.pth`, from its GitHub releases) loads as is; medim never
downloads it. Any callable `images [B, 3, 299, 299] in [0, 1] -> features [B, D]` can replace it;
one with a `preprocess(images) -> batch` method (as `RadDinoFeatures`) prepares its own input.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from medim.data.images import load_image
from medim.evaluation.inception import INCEPTION_SIZE, FIDInceptionV3
from medim.evaluation.rad_features import RAD_DINO, RadDinoFeatures
from medim.utils.checks import check_choice, check_int
from medim.utils.hub import HubOptions

__all__ = ["FIDInceptionV3", "FIDResult", "fid", "frechet_distance", "feature_statistics", "load_images"]

logger = logging.getLogger(__name__)

FEATURES = ("inception", "rad-dino")
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
MIN_RECOMMENDED_IMAGES = 2000


# ---------------------------------------------------------------- the distance
def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of `[N, D]` features, in float64."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(f.shape)}")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinity")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    The trace of the matrix square root is taken as the sum of the square roots of the eigenvalues
    of S1^1/2 S2 S1^1/2 (symmetric, positive semi-definite), which equals pytorch-fid's
    `scipy.linalg.sqrtm` value on well-conditioned covariances and stays real and finite on singular
    ones (fewer images than feature dimensions), where sqrtm needs an eps offset.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------- images and the pipeline
ImageSource = str | os.PathLike | Sequence[Any]


def load_images(source: ImageSource, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Any]:
    """A folder (its files with one of `extensions`, sorted by name, not recursive) or a list of
    paths / PIL images -> list of paths and PIL images (files are opened lazily, batch by batch)."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of images")
        items = sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions and p.is_file())
        if not items:
            raise ValueError(f"{folder} holds no images ({', '.join(extensions)})")
        return items
    if not isinstance(source, Sequence):
        raise TypeError(f"images must be a folder or a list of paths/PIL images, got {type(source).__name__}")
    for i, item in enumerate(source):
        if not isinstance(item, (str, os.PathLike, Image.Image)):
            raise TypeError(f"image {i} is {type(item).__name__}, expected a path or a PIL image")
        if not isinstance(item, Image.Image) and not Path(item).is_file():
            raise FileNotFoundError(f"image {i}: {item} does not exist")
    return list(source)


def read_image(item: Any) -> Image.Image:
    """`load_image(item)` as RGB; an image that cannot be read stops the metric with a ValueError
    naming its file (a score over the other images would not be the score of the folder)."""
    try:
        return load_image(item)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        name = "" if isinstance(item, Image.Image) or str(item) in str(e) else f"{item}: "
        raise ValueError(f"{name}{e} (remove or replace it to compute the metric)") from e


def _to_tensor(item: Any) -> torch.Tensor:
    # load_image gives RGB like pytorch-fid's convert("RGB"), but rescales 16-bit X-rays by their
    # range instead of saturating them.
    x = torch.from_numpy(np.asarray(read_image(item), dtype=np.float32) / 255.0).permute(2, 0, 1)
    # Resizing each image alone is what pytorch-fid's in-network resize does per image; it lets
    # folders of mixed sizes share a batch (and is the identity at 299x299).
    return F.interpolate(
        x[None], size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
    )[0]


@torch.no_grad()
def _features(items, extractor, batch_size, device, desc) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start : start + batch_size]
        preprocess = getattr(extractor, "preprocess", None)  # an extractor that prepares its own input
        batch = preprocess(chunk) if preprocess is not None else torch.stack([_to_tensor(i) for i in chunk])
        batch = batch.to(device)
        feats = extractor(batch)
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(
                f"feature_extractor must return [B, D] features for B={batch.shape[0]}, got {shape}"
            )
        out.append(feats.double().cpu().numpy())
    return np.concatenate(out)


@dataclass
class FIDResult:
    """What `fid` returns: the distance, how many images each side had, the feature size and
    which extractor produced the features."""

    fid: float
    num_real: int
    num_generated: int
    feature_dim: int
    extractor: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_extractor(features, feature_extractor, weights) -> None:
    check_choice(features, "features", FEATURES)
    if features == "rad-dino":
        if feature_extractor is not None:
            raise ValueError("features='rad-dino' brings its own extractor: leave feature_extractor=None")
        return
    if (feature_extractor is None) == (weights is None):
        raise ValueError(
            "pass exactly one of weights= (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, from "
            "https://github.com/mseitzer/pytorch-fid/releases) or feature_extractor= (a callable images -> [N, D])"
        )
    if feature_extractor is not None and not callable(feature_extractor):
        raise TypeError("feature_extractor must be callable: images [B, 3, 299, 299] -> [B, D]")


def _extractor(features, feature_extractor, weights, device, hub) -> tuple[Callable, str]:
    """The feature extractor `fid` runs, and its name."""
    if features == "rad-dino":
        extractor = RadDinoFeatures.from_pretrained(RAD_DINO if weights is None else weights, device, hub)
        return extractor, extractor.__name__
    if feature_extractor is not None:
        return feature_extractor, getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    return FIDInceptionV3.from_weights(weights).to(device), f"FID Inception-v3 pool3 ({Path(weights).name})"


def fid(
    real: ImageSource,
    generated: ImageSource,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    *,
    features: str = "inception",
    hub: HubOptions | None = None,
) -> FIDResult:
    """FID between two sets of images, with pytorch-fid's defaults, or the same Frechet distance on
    RAD-DINO features.

    Args:
        real, generated: folders of images or lists of paths / PIL images (any size and mode;
            converted to RGB, resized to 299x299 bilinearly, or as RAD-DINO's processor does).
        feature_extractor: a callable `[B, 3, 299, 299] float in [0, 1] -> [B, D]`; default the FID
            Inception-v3 with `weights`.
        weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or a safetensors copy),
            required for Inception features without `feature_extractor`; with `features="rad-dino"`,
            a RAD-DINO folder or Hub id (default "microsoft/rad-dino").
        batch_size: images per forward pass.
        device: where the extractor runs (default: CUDA if available, else CPU).
        features: "inception" (FID) or "rad-dino" (`RadDinoFeatures`: the model card's
            preprocessing, 768-d `pooler_output`).
        hub: Hub options for a RAD-DINO Hub id (`HF_HUB_OFFLINE=1` reads only the cache).

    Example:
        >>> from medim.evaluation import fid
        >>> fid("data/real", "out/images", weights="pt_inception-2015-12-05-6726825d.pth").fid  # doctest: +SKIP
        >>> fid("data/real", "out/images", features="rad-dino", weights="rad-dino/").fid  # doctest: +SKIP
    """
    check_int(batch_size, "batch_size", minimum=1)
    _check_extractor(features, feature_extractor, weights)
    real_items, fake_items = load_images(real), load_images(generated)
    for name, items in (("real", real_items), ("generated", fake_items)):
        if len(items) < 2:
            raise ValueError(f"{name} needs at least 2 images for a covariance, got {len(items)}")
        if len(items) < MIN_RECOMMENDED_IMAGES:
            warnings.warn(
                f"{name} has {len(items)} images: FID is biased and noisy under {MIN_RECOMMENDED_IMAGES} "
                "(pytorch-fid's advice); compare only numbers computed with the same N",
                UserWarning,
                stacklevel=2,
            )
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    feature_extractor, name = _extractor(features, feature_extractor, weights, device, hub)
    f_real = _features(real_items, feature_extractor, batch_size, device, "FID real")
    f_fake = _features(fake_items, feature_extractor, batch_size, device, "FID generated")
    if f_real.shape[1] != f_fake.shape[1]:
        raise ValueError(f"feature sizes differ: {f_real.shape[1]} vs {f_fake.shape[1]}")
    value = frechet_distance(*feature_statistics(f_real), *feature_statistics(f_fake))
    logger.info("FD %.4f on %s (N real %d, N generated %d)", value, name, len(real_items), len(fake_items))
    return FIDResult(value, len(real_items), len(fake_items), int(f_real.shape[1]), name)

"""Frechet Inception Distance with pytorch-fid's defaults, offline.

The feature extractor is the FID Inception-v3 (TensorFlow's 2015-12-05 graph as ported by
pytorch-fid): input resized to 299x299 bilinearly, scaled from [0, 1] to [-1, 1], 2048-d pool3
features. Module names follow torchvision's Inception3, so pytorch-fid's weights file
(`pt_inception-2015-12-05-6726825d.pth`, from its GitHub releases) loads as is; medim never
downloads it. Any callable `images [B, 3, 299, 299] in [0, 1] -> features [B, D]` can replace it.
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
from torch import nn
from tqdm.auto import tqdm

from medim.data.images import load_image
from medim.hub import resolve_file

__all__ = ["FIDInceptionV3", "FIDResult", "fid", "frechet_distance", "feature_statistics", "load_images"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
INCEPTION_SIZE = 299
MIN_RECOMMENDED_IMAGES = 2000


# ---------------------------------------------------------------- the FID Inception-v3
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TensorFlow's average pooling ignores the zero padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """`max_pool=True` is the FID graph's last block, which pools with max instead of average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 up to the final average pool: `[B, 3, H, W]` in [0, 1] ->
    `[B, 2048]`. Build with random weights, then `load_weights(path)`; or `from_weights(path)`.

    Example:
        >>> net = FIDInceptionV3.from_weights("pt_inception-2015-12-05-6726825d.pth")  # doctest: +SKIP
        >>> net(torch.rand(2, 3, 512, 512)).shape  # doctest: +SKIP
        torch.Size([2, 2048])
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def load_weights(self, path: str | os.PathLike) -> FIDInceptionV3:
        """Load pytorch-fid's `.pth` (read with `weights_only=True`) or a `.safetensors` copy.
        The classifier (`fc.*`) is not used and is ignored; any other missing or unexpected key
        raises, listing them."""
        path = resolve_file(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"weights={str(path)!r} is not a readable PyTorch state dict: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"weights={str(path)!r} does not hold a state dict")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in own)
        wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"weights={str(path)!r} is not an FID Inception-v3 state dict: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape "
                f"{wrong[:5]} ({len(wrong)})"
            )
        self.load_state_dict(state, strict=False)
        return self

    @classmethod
    def from_weights(cls, path: str | os.PathLike) -> FIDInceptionV3:
        return cls().load_weights(path)


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


def load_images(source: ImageSource) -> list[Any]:
    """A folder (its image files, sorted by name, not recursive) or a list of paths / PIL images
    -> list of paths and PIL images (files are opened lazily, batch by batch)."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder of images")
        items = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not items:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return items
    if not isinstance(source, Sequence):
        raise TypeError(f"images must be a folder or a list of paths/PIL images, got {type(source).__name__}")
    for i, item in enumerate(source):
        if not isinstance(item, (str, os.PathLike, Image.Image)):
            raise TypeError(f"image {i} is {type(item).__name__}, expected a path or a PIL image")
        if not isinstance(item, Image.Image) and not Path(item).is_file():
            raise FileNotFoundError(f"image {i}: {item} does not exist")
    return list(source)


def _to_tensor(item: Any) -> torch.Tensor:
    # load_image gives RGB like pytorch-fid's convert("RGB"), but rescales 16-bit X-rays by their
    # range instead of saturating them.
    x = torch.from_numpy(np.asarray(load_image(item), dtype=np.float32) / 255.0).permute(2, 0, 1)
    # Resizing each image alone is what pytorch-fid's in-network resize does per image; it lets
    # folders of mixed sizes share a batch (and is the identity at 299x299).
    return F.interpolate(
        x[None], size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
    )[0]


@torch.no_grad()
def _features(items, extractor, batch_size, device, desc) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        batch = torch.stack([_to_tensor(i) for i in items[start : start + batch_size]]).to(device)
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


def fid(
    real: ImageSource,
    generated: ImageSource,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> FIDResult:
    """FID between two sets of images, with pytorch-fid's defaults.

    Args:
        real, generated: folders of images or lists of paths / PIL images (any size and mode;
            converted to RGB, resized to 299x299 bilinearly).
        feature_extractor: a callable `[B, 3, 299, 299] float in [0, 1] -> [B, D]`; default the FID
            Inception-v3 with `weights`.
        weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or a safetensors copy);
            required when `feature_extractor` is None.
        batch_size: images per forward pass.
        device: where the extractor runs (default: CUDA if available, else CPU).

    Example:
        >>> from medim.evaluation import fid
        >>> fid("data/real", "out/images", weights="pt_inception-2015-12-05-6726825d.pth").fid  # doctest: +SKIP
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (feature_extractor is None) == (weights is None):
        raise ValueError(
            "pass exactly one of weights= (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, from "
            "https://github.com/mseitzer/pytorch-fid/releases) or feature_extractor= (a callable images -> [N, D])"
        )
    if feature_extractor is not None and not callable(feature_extractor):
        raise TypeError("feature_extractor must be callable: images [B, 3, 299, 299] -> [B, D]")
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
    if feature_extractor is None:
        feature_extractor = FIDInceptionV3.from_weights(weights).to(device)
        name = f"FID Inception-v3 pool3 ({Path(weights).name})"
    else:
        name = getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
    f_real = _features(real_items, feature_extractor, batch_size, device, "FID real")
    f_fake = _features(fake_items, feature_extractor, batch_size, device, "FID generated")
    if f_real.shape[1] != f_fake.shape[1]:
        raise ValueError(f"feature sizes differ: {f_real.shape[1]} vs {f_fake.shape[1]}")
    value = frechet_distance(*feature_statistics(f_real), *feature_statistics(f_fake))
    logger.info("FID %.4f (N real %d, N generated %d)", value, len(real_items), len(fake_items))
    return FIDResult(value, len(real_items), len(fake_items), int(f_real.shape[1]), name)

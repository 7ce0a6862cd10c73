"""Inception Score as the release's `is_score.py` computes it, offline.

Each image: RGB, resized to 256x256 (bicubic), scaled to [-1, 1], upsampled bilinearly to 299x299,
classified by torchvision's ImageNet Inception-v3 (softmax over 1000 classes). The images, in
sorted order, are cut into `splits` consecutive parts of N // splits (the remainder is dropped);
each part scores exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean; mean and std over parts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from medim.evaluation.fid import ImageSource, load_images, read_image
from medim.evaluation.inception import INCEPTION_SIZE, InceptionV3
from medim.utils.checks import check_int

__all__ = ["InceptionScoreResult", "inception_score", "inception_score_from_probs"]

logger = logging.getLogger(__name__)

RESIZE = 256  # the release resizes to 256x256 before the network's own upsampling to 299


@dataclass
class InceptionScoreResult:
    """What `inception_score` returns: mean and (population) std of the per-part scores, the
    per-part scores, how many images were found and how many were scored (N // splits * splits),
    and which classifier produced the probabilities."""

    mean: float
    std: float
    split_scores: list[float]
    num_images: int
    num_scored: int
    splits: int
    classifier: str = field(default="probabilities")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inception_score_from_probs(probs: np.ndarray | torch.Tensor, splits: int = 10) -> InceptionScoreResult:
    """IS of `[N, C]` class probabilities (rows in order), cut into `splits` consecutive parts of
    N // splits rows; the last N % splits rows are dropped, as in the release.

    p(y) is the part's mean row; KL is computed in float64 after normalising p(y|x) and p(y) to sum
    1 (what the release's `scipy.stats.entropy` does to its inputs); 0 log 0 counts as 0.

    Example:
        >>> inception_score_from_probs(np.eye(4)[[0, 1, 2, 3] * 5], splits=5).mean  # 4 classes, equal share
        4.0
    """
    p = probs.detach().cpu().double().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    check_int(splits, "splits", minimum=1)
    if p.ndim != 2 or p.shape[0] < splits:
        raise ValueError(f"probs must be [N, C] with N >= splits={splits}, got shape {tuple(p.shape)}")
    if not np.isfinite(p).all() or (p < 0).any() or (p.sum(axis=1) <= 0).any():
        raise ValueError("probs must be finite, non-negative, with a positive sum in every row")
    part = p.shape[0] // splits
    scores = []
    for k in range(splits):
        rows = p[k * part : (k + 1) * part]
        py = rows.mean(axis=0, keepdims=True)
        py, pyx = py / py.sum(), rows / rows.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(pyx > 0, pyx * np.log(pyx / py), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return InceptionScoreResult(
        float(np.mean(scores)), float(np.std(scores)), scores, p.shape[0], part * splits, splits
    )


def _to_tensor(item: Any) -> torch.Tensor:
    # load_image gives RGB (the release's convert("RGB") for RGB, L and P images).
    image = read_image(item).resize((RESIZE, RESIZE), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


@torch.no_grad()
def _probabilities(items, classifier, batch_size, device) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc="Inception Score", unit="batch"):
        batch = torch.stack([_to_tensor(i) for i in items[start : start + batch_size]]).to(device)
        batch = F.interpolate(batch, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        logits = classifier(batch)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != batch.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier must return [B, C] logits for B={batch.shape[0]}, got {shape}")
        out.append(F.softmax(logits.float(), dim=1).double().cpu().numpy())
    return np.concatenate(out)


def inception_score(
    images: ImageSource,
    weights: str | os.PathLike | None = None,
    splits: int = 10,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> InceptionScoreResult:
    """Inception Score of a folder (its `.png` files in sorted name order, as the release reads
    them) or a list of paths / PIL images, computed the release's way.

    Args:
        images: folder or list of paths / PIL images (any size and mode; converted to RGB).
        weights: torchvision's `inception_v3_google-0cc3c7bd.pth` (or a safetensors copy); default:
            that file in torch's hub cache (`torch.hub.get_dir()/checkpoints`). Never downloaded.
        splits: number of consecutive parts (release: 10); N // splits images each.
        batch_size: images per forward pass (does not change the result).
        device: where the network runs (default: CUDA if available, else CPU).
        classifier: instead of the Inception network, any callable
            `[B, 3, 299, 299] in [-1, 1] -> [B, C] logits`.

    Example:
        >>> from medim.evaluation import inception_score
        >>> out = inception_score("out/images", weights="inception_v3_google-0cc3c7bd.pth")  # doctest: +SKIP
        >>> out.mean, out.std  # doctest: +SKIP
    """
    check_int(batch_size, "batch_size", minimum=1)
    check_int(splits, "splits", minimum=1)
    if classifier is not None and weights is not None:
        raise ValueError("pass weights= (the Inception network) or classifier=, not both")
    if classifier is not None and not callable(classifier):
        raise TypeError("classifier must be callable: images [B, 3, 299, 299] -> logits [B, C]")
    items = load_images(images, extensions=(".png",))
    if len(items) < splits:
        raise ValueError(f"{len(items)} images cannot be cut into splits={splits} parts")
    if len(items) % splits:
        logger.info("IS: the last %d of %d images are dropped (N // splits per part)", len(items) % splits, len(items))
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if classifier is None:
        net = InceptionV3.from_weights(weights)
        name = f"torchvision Inception-v3 ({Path(weights).name if weights else 'torch hub cache'})"
        classifier = net.to(device)
    else:
        name = getattr(classifier, "__name__", type(classifier).__name__)
    # Only the images that are scored go through the network.
    used = items[: len(items) // splits * splits]
    out = inception_score_from_probs(_probabilities(used, classifier, batch_size, device), splits)
    out.num_images, out.classifier = len(items), name
    logger.info("IS %.4f +- %.4f (%d of %d images, %d splits)", out.mean, out.std, out.num_scored, len(items), splits)
    return out

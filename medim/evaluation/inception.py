"""Inception-v3 in its two evaluation variants, with torchvision's module names: pytorch-fid's FID
network (2048-d pool3 features) and torchvision's ImageNet classifier (1000 logits, for IS).

The variants share every block and differ only in pooling: the FID graph (TensorFlow's) averages
without counting the zero padding and max-pools in its last block, torchvision's counts the padding.
Weights are read from local files only (`.pth` with `weights_only=True`, or `.safetensors`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medim.utils.hub import resolve_file

__all__ = ["FIDInceptionV3", "InceptionV3", "TORCHVISION_INCEPTION_FILE", "find_torchvision_inception"]

INCEPTION_SIZE = 299
TORCHVISION_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
TORCHVISION_INCEPTION_URL = f"https://download.pytorch.org/models/{TORCHVISION_INCEPTION_FILE}"


# ---------------------------------------------------------------- blocks
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool(x, kind: str):
    """The 3x3 stride-1 pooling of a block's pool branch. "tf": average ignoring the zero padding
    (TensorFlow's, the FID graph), "avg": average counting it (torchvision's), "max"."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=kind == "avg")


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
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
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool(x, self.pool))], 1)


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
    def __init__(self, cin: int, c7: int, pool: str):
        super().__init__()
        self.pool = pool
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
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_pool(x, self.pool))], 1)


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
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
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
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(_pool(x, self.pool))], 1)


class InceptionAux(nn.Module):
    """torchvision's auxiliary classifier: part of its state dict, used only in training."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv0 = BasicConv2d(cin, 128, kernel_size=1)
        self.conv1 = BasicConv2d(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.conv1(self.conv0(F.avg_pool2d(x, 5, stride=3)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---------------------------------------------------------------- the two networks
class _InceptionBody(nn.Module):
    """Stem and the eleven mixed blocks; `fid` picks the FID graph's pooling over torchvision's."""

    def __init__(self, fid: bool):
        super().__init__()
        avg = "tf" if fid else "avg"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32, pool=avg)
        self.Mixed_5c = InceptionA(256, pool_features=64, pool=avg)
        self.Mixed_5d = InceptionA(288, pool_features=64, pool=avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128, pool=avg)
        self.Mixed_6c = InceptionC(768, c7=160, pool=avg)
        self.Mixed_6d = InceptionC(768, c7=160, pool=avg)
        self.Mixed_6e = InceptionC(768, c7=192, pool=avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=avg)
        # The FID graph's last block max-pools.
        self.Mixed_7c = InceptionE(2048, pool="max" if fid else avg)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` network input -> `[B, 2048]` after the final global average pool."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def load_weights(self, path: str | os.PathLike, ignore_prefix: str | None = None):
        """Load a state dict from `path` (`.pth`, read with `weights_only=True`, or `.safetensors`).
        Keys starting with `ignore_prefix` are dropped; `num_batches_tracked` may be absent; any
        other missing, unexpected or wrongly shaped key raises, listing them."""
        path = resolve_file(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state = load_file(str(path))
            except Exception as e:
                raise ValueError(f"weights={str(path)!r} is not a readable safetensors file: {e}") from e
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                # Not torch's advice (it suggests weights_only=False, which would run the file's code).
                raise ValueError(f"weights={str(path)!r} is not a readable PyTorch state dict of tensors "
                                 f"({type(e).__name__}); medim reads weights with weights_only=True and never runs "
                                 f"code from a file: give {self._weights_name} state dict") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"weights={str(path)!r} does not hold a state dict of tensors")
        if ignore_prefix:
            state = {k: v for k, v in state.items() if not k.startswith(ignore_prefix)}
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in own)
        wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"weights={str(path)!r} is not {self._weights_name} state dict: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape "
                f"{wrong[:5]} ({len(wrong)})"
            )
        self.load_state_dict(state, strict=False)
        return self


class FIDInceptionV3(_InceptionBody):
    """pytorch-fid's FID Inception-v3 up to the final average pool: `[B, 3, H, W]` in [0, 1] ->
    `[B, 2048]`. Build with random weights, then `load_weights(path)`; or `from_weights(path)`.
    pytorch-fid's file (`pt_inception-2015-12-05-6726825d.pth`) also holds a 1008-way classifier
    (`fc.*`), which is not used and is ignored.

    Example:
        >>> net = FIDInceptionV3.from_weights("pt_inception-2015-12-05-6726825d.pth")  # doctest: +SKIP
        >>> net(torch.rand(2, 3, 512, 512)).shape  # doctest: +SKIP
        torch.Size([2, 2048])
    """

    _weights_name = "an FID Inception-v3"

    def __init__(self):
        super().__init__(fid=True)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.pool3(2 * x - 1)

    def load_weights(self, path: str | os.PathLike) -> FIDInceptionV3:
        return super().load_weights(path, ignore_prefix="fc.")

    @classmethod
    def from_weights(cls, path: str | os.PathLike) -> FIDInceptionV3:
        return cls().load_weights(path)


def find_torchvision_inception() -> Path:
    """torchvision's ImageNet Inception-v3 file in torch's hub cache (where torchvision would have
    downloaded it), or FileNotFoundError saying where to get it. Nothing is downloaded."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"torchvision's ImageNet Inception-v3 weights {TORCHVISION_INCEPTION_FILE} are not in torch's hub "
            f"cache ({path}); medim does not download them: get {TORCHVISION_INCEPTION_URL} and pass its path "
            "(weights=... / --weights), or put it in that folder"
        )
    return path


class InceptionV3(_InceptionBody):
    """torchvision's ImageNet Inception-v3 classifier (`inception_v3(transform_input=False)` in eval
    mode): `[B, 3, 299, 299]` normalised to [-1, 1] -> `[B, 1000]` logits. Key names are
    torchvision's, the training-only auxiliary head (`AuxLogits.*`) included, so its
    `inception_v3_google-0cc3c7bd.pth` loads strictly.

    Example:
        >>> net = InceptionV3.from_weights()  # from torch's hub cache  # doctest: +SKIP
        >>> net(torch.zeros(2, 3, 299, 299)).softmax(-1).shape  # doctest: +SKIP
        torch.Size([2, 1000])
    """

    _weights_name = "a torchvision Inception-v3"

    def __init__(self, num_classes: int = 1000):
        super().__init__(fid=False)
        self.AuxLogits = InceptionAux(768, num_classes)
        self.fc = nn.Linear(2048, num_classes)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Dropout before fc is the identity in eval mode.
        return self.fc(self.pool3(images))

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None) -> InceptionV3:
        """Load `path`, or torchvision's file from torch's hub cache when None."""
        return cls().load_weights(find_torchvision_inception() if path is None else path)

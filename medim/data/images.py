"""Image pre- and post-processing around the VQGAN.

Medical images come in many shapes: 8-bit grayscale, 16-bit X-rays, RGBA screenshots, DICOM files,
odd sizes. `load_image` turns any of them into an RGB PIL image (a DICOM file, named `.dcm` or
holding the DICOM preamble, through `medim.data.dicom`'s display chain), `preprocess` makes the
square [-1, 1] batch the VQGAN encodes (MeDiM's pad-to-square or Liquid's center crop), and
`postprocess` turns decoded pixels back into uint8 images.

Example:
    >>> pixels, sizes = preprocess(["cxr.png", Image.open("cxr16.tif")], return_sizes=True)
    >>> pixels.shape, sizes                     # torch.Size([2, 3, 512, 512]), [(2544, 3056), ...]
    >>> images = postprocess(vqgan.decode(vqgan.encode(pixels)))   # list of RGB PIL images
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medim.data.dicom import DICOM_SUFFIXES, is_dicom, read_dicom

T = TypeVar("T")

__all__ = ["PAD_COLOR", "DICOM_SUFFIXES", "ImageInput", "load_image", "read_image_file", "preprocess", "postprocess"]

ImageInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor

# MeDiM pads to a square with this colour (the ImageNet mean in 8 bit) before resizing.
PAD_COLOR = (122, 116, 104)
RESIZE_MODES = ("pad", "crop")
OUTPUT_TYPES = ("pil", "np")
# Modes that hold more than 8 bits per pixel: rescaled by their actual range, not clipped.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
PLAIN_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV")


def _range_to_uint8(a: np.ndarray) -> np.ndarray:
    # 16-bit X-rays rarely use the full 0..65535 range: stretch the range actually used to 0..255.
    a = a.astype(np.float64)
    lo, hi = a.min(), a.max()
    if hi == lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _check_finite(a: np.ndarray, what: str) -> None:
    # NaN/inf would turn the range stretch (or the [0, 1] check) into a black or garbage image.
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{what} holds {int(bad.sum())} NaN or infinite value(s) out of {a.size}; "
                         "replace them or leave the image out")


def _array_to_pil(a: np.ndarray, what: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"{what} must be HxW or HxWxC with C in (1, 3, 4), got shape {list(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {list(a.shape)})")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer):
        a = _range_to_uint8(a)
    elif np.issubdtype(a.dtype, np.floating):
        _check_finite(a, what)
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"float {what} must hold finite values in [0, 1], got [{a.min()}, {a.max()}]; "
                             "rescale it first (decoded [-1, 1] pixels go through postprocess)")
        a = np.rint(a * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"{what} has unsupported dtype {a.dtype}; accepted: uint8, uint16/other ints, bool, float")
    return Image.fromarray(np.ascontiguousarray(a))  # uint8 HxW -> "L", HxWx3 -> "RGB", HxWx4 -> "RGBA"


def read_image_file(path: str | os.PathLike, read: Callable[[Image.Image], T], kind: str = "image",
                    prefix: str = "") -> T:
    """`read` applied to the decoded image in the file at `path` (while it is open); a missing or
    unreadable file raises FileNotFoundError / ValueError saying so, after `prefix` (e.g. "masks[2]: ").

    A DICOM file (`medim.data.dicom.is_dicom`) is read by `read_dicom` and given to `read` as the
    8-bit image a viewer shows ("L" for grayscale, "RGB" for colour).

    Example:
        >>> read_image_file("phantom.png", lambda im: im.size)
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{prefix}{kind} file {path} does not exist")
    if is_dicom(path):
        try:
            pixels = read_dicom(path)
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None
        return read(_array_to_pil(pixels, str(path)))
    try:
        with Image.open(path) as opened:
            opened.load()
            return read(opened)
    except UnidentifiedImageError as e:
        raise ValueError(f"{prefix}{path} is not an image file PIL can read") from e
    except OSError as e:  # e.g. "image file is truncated"
        raise ValueError(f"{prefix}{path} could not be decoded: {e}") from e


def load_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """Return `image` as an RGB PIL image.

    Accepts a PIL image of any common mode (L, 1, P, RGB, CMYK, ...; 16/32-bit "I;16", "I", "F"
    are rescaled to 8 bit by their actual min/max; alpha modes are composited on white), a file
    path, a numpy array HxW or HxWxC (C = 1, 3, 4; uint8, other ints rescaled by range, floats in
    [0, 1]) or a tensor CxHxW / HxW with the same dtype rules. A DICOM file is shown as a viewer
    would (`medim.data.dicom.read_dicom`: Modality LUT, VOI LUT or window, MONOCHROME1 inverted).
    Float images holding NaN or inf are refused. `name` is what errors call the input (default: its
    file path, else "image", "image array" or "image tensor").

    Example:
        >>> load_image(np.zeros((64, 48), dtype=np.uint16)).mode
        'RGB'
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        return read_image_file(path, lambda opened: load_image(opened, f"{name} ({path})" if name else str(path)))
    if isinstance(image, torch.Tensor):
        what = name or "image tensor"
        t = image.detach().cpu()
        if t.ndim == 3:
            if t.shape[0] not in (1, 3, 4):
                raise ValueError(f"{what} must be CxHxW with C in (1, 3, 4), got shape {list(t.shape)}")
            t = t.permute(1, 2, 0)
        elif t.ndim != 2:
            raise ValueError(f"{what} must be CxHxW or HxW, got shape {list(t.shape)}")
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        return load_image(t.numpy(), what)
    if isinstance(image, np.ndarray):
        what = name or "image array"
        return load_image(_array_to_pil(image, what), what)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a path, a numpy array or a tensor, got {type(image).__name__}")

    what = name or getattr(image, "filename", "") or "image"
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what} is empty ({image.width}x{image.height})")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in HIGH_DEPTH_MODES:
        a = np.asarray(image)
        if np.issubdtype(a.dtype, np.floating):
            _check_finite(a, f"{what} (PIL mode {mode!r})")
        return Image.fromarray(_range_to_uint8(a)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in PLAIN_MODES:
        return image.convert("RGB")
    accepted = ", ".join(PLAIN_MODES + HIGH_DEPTH_MODES + ALPHA_MODES)
    raise ValueError(f"{what} has unsupported image mode {mode!r}; accepted: {accepted}")


def _pad_to_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new("RGB", (side, side), PAD_COLOR)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(
    images: ImageInput | Sequence[ImageInput],
    size: int = 512,
    resize: str = "pad",
    return_sizes: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, int]]]:
    """Turn images into the VQGAN's input: a float32 tensor [B, 3, size, size] in [-1, 1].

    Args:
        images: one image or a list of them (anything `load_image` accepts); a 4-D array or
            tensor is read as a batch of HxWxC / CxHxW images.
        size: output side in pixels (512 for MeDiM; a multiple of the VQGAN's downsample factor).
        resize: "pad" (MeDiM: pad to a square with `PAD_COLOR`, then LANCZOS resize) or "crop"
            (Liquid: LANCZOS resize of the short side to `size`, then center crop).
        return_sizes: also return each input's ORIGINAL (width, height), which the medim-v1
            layout writes into its size prompt.

    Example:
        >>> preprocess(Image.new("L", (300, 200))).shape
        torch.Size([1, 3, 512, 512])
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if isinstance(images, (list, tuple)):
        batch = list(images)
    elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        batch = list(images)
    else:
        batch = [images]
    if not batch:
        raise ValueError("images is empty: pass at least one image")
    rgb = [load_image(image, name=f"images[{i}]" if len(batch) > 1 else None) for i, image in enumerate(batch)]
    sizes = [im.size for im in rgb]
    if resize == "pad":
        rgb = [_pad_to_square(im).resize((size, size), Image.Resampling.LANCZOS) for im in rgb]
    else:
        rgb = [_resize_center_crop(im, size) for im in rgb]
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in rgb])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    return (pixels, sizes) if return_sizes else pixels


def postprocess(pixels: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
    """Turn decoded pixels [B, 3, H, W] (or [3, H, W]) in [-1, 1] into uint8 images.

    Values are clamped, mapped with (x + 1) * 127.5 and rounded to the nearest integer.
    `output_type="pil"` gives a list of RGB PIL images, `"np"` a uint8 array [B, H, W, 3].

    Example:
        >>> postprocess(torch.zeros(1, 3, 8, 8), output_type="np")[0, 0, 0]
        array([128, 128, 128], dtype=uint8)
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise TypeError(f"pixels must be a float tensor [B, 3, H, W] in [-1, 1], got {type(pixels).__name__}"
                        + (f" of dtype {pixels.dtype}" if isinstance(pixels, torch.Tensor) else ""))
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape [B, 3, H, W] or [3, H, W], got {list(pixels.shape)}")
    if torch.isnan(pixels).any():
        raise ValueError("pixels contain NaN")
    out = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = out.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arrays
    return [Image.fromarray(a) for a in arrays]

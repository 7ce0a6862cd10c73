"""What the web app's buttons run: the pipeline's tasks on the values of its widgets, with no Gradio in
sight, so they are tested as plain functions. Bad inputs raise ValueError or TypeError (the
pipeline's own, or ours for what only the app knows) before any compute; the app shows them.
Images arrive decoded by Gradio, or as files it could not decode (`read_upload` names those).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medim.data.images import load_image
from medim.data.synthetic import make_pair
from medim.pipelines.editing import load_mask
from medim.utils.checks import check_int

__all__ = ["MAX_COUNT", "Sampling", "Progress", "text_to_image", "image_to_report", "generate_pairs", "inpaint",
           "mask_from_editor", "read_upload", "example_phantoms"]

# Outputs of one click: the app runs on a laptop as well as on a GPU, and every click holds the device.
MAX_COUNT = 8

Progress = Callable[[int, int], None]  # (steps done, steps in all)


def _int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """A widget's number as an int: sliders may send 16.0 for 16."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(value, name, minimum=low, maximum=high)


@dataclass(frozen=True)
class Sampling:
    """The sampler controls, named as the pipeline's arguments (checked by the pipeline, except the
    seed, which only the app turns into a generator)."""

    num_inference_steps: Any
    guidance_scale: Any
    strategy: Any
    seed: Any

    def kwargs(self, progress: Progress | None, total: int) -> dict[str, Any]:
        """Keyword arguments of a pipeline task; `progress` hears of each of the `total` steps."""
        seed = _int(self.seed, "seed", 0, 2**63 - 1)
        steps = self.num_inference_steps
        steps = _int(steps, "num_inference_steps", 1) if isinstance(steps, float) else steps
        done = [0]

        def on_step(pipe: Any, step: int, t: float, tokens: torch.Tensor) -> None:
            done[0] += 1
            progress(done[0], total)

        return dict(num_inference_steps=steps, guidance_scale=self.guidance_scale, strategy=self.strategy,
                    generator=torch.Generator().manual_seed(seed),
                    callback_on_step_end=on_step if progress is not None else None)


def _text(value: Any, name: str, required: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"the {name} is empty: write one first")
        return None
    if not isinstance(value, str):
        raise TypeError(f"the {name} must be text, got {type(value).__name__}")
    return value.strip()


def read_upload(path: str | Path, name: str) -> Image.Image:
    """An uploaded file as an RGB image (any format PIL reads, or DICOM); a file that is not one
    raises ValueError calling it `name` (its name on the user's machine, not the server's copy).

    Example:
        >>> read_upload("/tmp/gradio/3f2a/chest.dcm", "chest.dcm").mode  # doctest: +SKIP
        'RGB'
    """
    try:
        return load_image(Path(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"the uploaded file {name!r} cannot be read as an image: "
                         f"{str(e).replace(str(path), repr(name))}") from None


def _image(value: Any, name: str) -> Image.Image:
    """A widget's image (PIL, array or path) as an RGB image, decoded now: a truncated file fails
    here, naming `name`, and not inside the model."""
    if value is None:
        raise ValueError(f"no {name}: upload one or pick an example phantom")
    if isinstance(value, (str, Path)):
        return read_upload(value, Path(value).name)
    if not isinstance(value, (Image.Image, np.ndarray)):
        raise TypeError(f"the {name} must be an image, got {type(value).__name__}")
    try:
        if isinstance(value, Image.Image):
            value.load()
        return load_image(value, f"the {name}")
    except OSError as e:  # PIL decodes lazily: "image file is truncated"
        raise ValueError(f"the {name} cannot be decoded: {e}") from None


def _steps(pipe: Any, sampling: Sampling) -> int:
    """Steps the progress bar counts (one chunk: the app samples all outputs of a click at once)."""
    steps = sampling.num_inference_steps
    steps = steps if steps is not None else pipe.sampler_config.num_inference_steps
    return int(steps) if isinstance(steps, (int, float)) and not isinstance(steps, bool) else 1


def text_to_image(pipe: Any, report: Any, count: Any, sampling: Sampling,
                  progress: Progress | None = None) -> list[Image.Image]:
    """`count` images of one report."""
    report = _text(report, "report", required=True)
    count = _int(count, "the number of images", 1, MAX_COUNT)
    out = pipe.text_to_image([report] * count, **sampling.kwargs(progress, _steps(pipe, sampling)))
    return out.images


def image_to_report(pipe: Any, image: Any, prompt: Any, sampling: Sampling,
                    progress: Progress | None = None) -> str:
    """The report of one image; a `prompt` is the beginning the report keeps."""
    image = _image(image, "image")
    out = pipe.image_to_report([image], prompt=_text(prompt, "prompt", required=False),
                               **sampling.kwargs(progress, _steps(pipe, sampling)))
    return out.reports[0]


def generate_pairs(pipe: Any, prompt: Any, count: Any, sampling: Sampling,
                   progress: Progress | None = None) -> list[tuple[Image.Image, str]]:
    """`count` image-report pairs whose reports begin with `prompt` (may be empty)."""
    prompt = _text(prompt, "prompt", required=False) or ""
    count = _int(count, "the number of pairs", 1, MAX_COUNT)
    out = pipe.generate_pairs([prompt], num_pairs_per_prompt=count,
                              **sampling.kwargs(progress, _steps(pipe, sampling)))
    return list(zip(out.images, out.reports))


def _layer_mask(layer: Any, size: tuple[int, int]) -> np.ndarray:
    """Where one editor layer is painted: its alpha > 0 (the strokes, whatever their colour), or for
    a layer without alpha, `load_mask`'s rule (white). A layer of another size than the image is
    refused: it cannot say which pixels it covers."""
    if isinstance(layer, np.ndarray):
        try:
            layer = Image.fromarray(np.ascontiguousarray(layer))
        except (TypeError, ValueError) as e:
            raise ValueError(f"a painted layer is not an image: array of shape {list(layer.shape)} and dtype "
                             f"{layer.dtype} ({e})") from None
    if not isinstance(layer, Image.Image):
        raise TypeError(f"a painted layer must be an image, got {type(layer).__name__}")
    if layer.size != size:
        raise ValueError(f"a painted layer is {layer.width}x{layer.height} but the image is {size[0]}x{size[1]}: "
                         "paint on the image itself")
    try:
        if layer.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in layer.info:
            return np.asarray(layer.convert("RGBA"))[:, :, 3] > 0
        return load_mask(layer, "a painted layer")
    except OSError as e:
        raise ValueError(f"a painted layer cannot be decoded: {e}") from None


def mask_from_editor(value: Any) -> tuple[Image.Image, Image.Image]:
    """The image and the drawn region of an image editor's value (`{"background", "layers",
    "composite"}`): the mask is set where any layer was painted (`_layer_mask`)."""
    if not isinstance(value, Mapping) or value.get("background") is None:
        raise ValueError("no image: upload one or pick an example phantom, then paint the region to redraw")
    background = _image(value["background"], "image")
    layers = value.get("layers") or []
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"the painted layers must be a list of images, got {type(layers).__name__}")
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in layers:
        if layer is not None:
            painted |= _layer_mask(layer, background.size)
    if not painted.any():
        raise ValueError("nothing painted: paint the region of the image to redraw")
    return background, Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def inpaint(pipe: Any, editor: Any, report: Any, grow: Any, sampling: Sampling,
            progress: Progress | None = None) -> tuple[Image.Image, str]:
    """Redraw the painted region of an image (`pipe.inpaint`) to match a report, or with no report
    written, together with a new one; `grow` widens the region by that many codes."""
    image, mask = mask_from_editor(editor)
    report = _text(report, "report", required=False)
    grow = _int(grow, "grow", 0, 8)
    out = pipe.inpaint([image], [mask], None if report is None else [report], mask_dilation=grow,
                       **sampling.kwargs(progress, _steps(pipe, sampling)))
    return out.images[0], out.reports[0]


def example_phantoms(folder: str | Path, size: int, seeds: range = range(4)) -> list[tuple[Path, str]]:
    """Phantom images (`medim.data.synthetic`) as PNG files in `folder`, each with its true report:
    the examples of the image tabs."""
    folder = Path(folder)
    side = min(max(size, 32), 2048)
    examples = []
    for seed in seeds:
        image, report, _ = make_pair(seed, size=side)
        path = folder / f"phantom_{seed}.png"
        image.save(path)
        examples.append((path, report))
    return examples

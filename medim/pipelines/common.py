"""What the task functions share: the typed parts a call runs on (`Runtime`), the output, the input
checks and the checked options of a sampling call (`RunSettings`), chunked sampling with one
generator per output and a progress bar, and the VQGAN in and out, one image at a time.

The checks run once, at the pipeline's public edge, before any compute; the task functions and what
is below them (layout, tasks, sampler) take their output as valid.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from medim.data.images import load_image, postprocess, preprocess
from medim.diffusion import tasks
from medim.diffusion.config import SamplerConfig
from medim.diffusion.sampler import check_generator, sample
from medim.layout import SequenceLayout
from medim.models.denoiser import ModelDenoiser
from medim.models.medim import MeDiMModel
from medim.models.vqgan import VQGAN
from medim.utils.checks import check_choice, check_int

__all__ = ["MAX_OUTPUTS", "MeDiMOutput", "Runtime", "RunSettings", "GeneratorInput", "StepCallback", "OUTPUT_TYPES",
           "check_text", "check_prompts", "check_report_lengths", "check_image_size", "run_settings",
           "sampler_settings", "row_generators", "run_chunks", "per_image", "image_list", "encode_images",
           "decode_images", "shown_inputs"]

OUTPUT_TYPES = ("pil", "pt", "tokens")
# Outputs of one task call: they are all held in memory at once (a bound, not a budget: 65536 images
# of 64 px take ~0.8 GB); `medim generate` makes any number, writing each batch to disk.
MAX_OUTPUTS = 65536

GeneratorInput = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, float, torch.Tensor], None]


@dataclass
class MeDiMOutput:
    """What a generation call returns.

    Attributes:
        images: generated (or, for image_to_report, the input) images: a list of RGB PIL images
            (`output_type="pil"`), a float tensor [B, 3, H, W] in [0, 1] ("pt") or the VQ codes
            LongTensor [B, image_len] ("tokens").
        reports: generated reports (or, for text_to_image, the prompts), one str per output.
        tokens: the final diffusion states [B, state_len] (backbone ids).
        nfe: network evaluations spent, summed over batch chunks.
    """

    images: list[Image.Image] | torch.Tensor | None = None
    reports: list[str] | None = None
    tokens: torch.LongTensor | None = None
    nfe: int = 0


@dataclass(frozen=True)
class Runtime:
    """The parts a task call runs on, built by `MeDiMPipeline` for each call.

    Attributes:
        model, vqgan, tokenizer: the pipeline's parts; `layout` is the model's.
        image_resolution: pixels per image side the VQGAN takes and gives.
        denoiser: what the sampler calls (the pipeline's compiled one, or an eager `ModelDenoiser`).
        sampler_config: the pipeline's default settings (the likelihood bound uses their schedule).
        progress: tqdm options of the progress bars (`MeDiMPipeline.set_progress_bar_config`).
    """

    model: MeDiMModel
    vqgan: VQGAN
    tokenizer: PreTrainedTokenizerBase
    layout: SequenceLayout
    image_resolution: int
    denoiser: ModelDenoiser
    sampler_config: SamplerConfig
    progress: Mapping[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.device


@dataclass(frozen=True)
class RunSettings:
    """The checked options of one sampling call: the sampler settings, outputs per forward batch
    (None: all at once), the generator(s), the output type and `callback(step, t, tokens)`."""

    config: SamplerConfig
    batch_size: int | None
    generator: GeneratorInput
    output_type: str
    callback: StepCallback | None


def check_text(text: str, name: str) -> str:
    """`text` as given, if it can be written as UTF-8 (the tokenizer's input, and the files a run
    writes): a lone surrogate such as "\\ud800" cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: it holds a lone surrogate {text[e.start]!r} at position "
                         f"{e.start} (a broken decode?)") from None
    return text


def check_prompts(prompts: Any, name: str = "prompts", allow_empty_text: bool = False) -> list[str]:
    """A non-empty list of str (each non-blank unless `allow_empty_text`, each valid UTF-8 text)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{name} is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(p).__name__}")
        if not allow_empty_text and not p.strip():
            raise ValueError(f"{name}[{i}] is empty")
        check_text(p, f"{name}[{i}]")
    return list(prompts)


def check_report_lengths(layout: SequenceLayout, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                         name: str) -> None:
    """Refuse texts that do not fit the model's report slots (`layout.text_len`): where the result
    is meant to show the text as given, a cut one would ask for another result."""
    for i, length in enumerate(layout.report_lengths(tokenizer, texts)):
        if length > layout.text_len:
            raise ValueError(f"{name}[{i}] takes {length} text slots, more than the model's reports hold "
                             f"(text_len={layout.text_len}): it would be cut, and the edit would not show it; "
                             "shorten it")


def check_image_size(image_size: Any) -> tuple[int, int]:
    """(width, height) as positive ints: the size the medim-v1 layout tells the model."""
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2):
        raise ValueError(f"image_size must be (width, height) positive ints, got {image_size!r}")
    return check_int(image_size[0], "image_size width", minimum=1), check_int(image_size[1], "image_size height",
                                                                               minimum=1)


def sampler_settings(defaults: SamplerConfig, sampler: SamplerConfig | None, options: Mapping[str, Any], *,
                     num_inference_steps: int | None, guidance_scale: float | None) -> SamplerConfig:
    """The call's settings: `sampler` (or the pipeline's `defaults`), then the `SamplerConfig`
    fields in `options`, then the two named ones when not None. Validated here (an unknown name or
    a bad value raises ValueError), before any compute."""
    if sampler is not None and not isinstance(sampler, SamplerConfig):
        raise TypeError(f"sampler must be a medim.diffusion.SamplerConfig or None, got {type(sampler).__name__}")
    named = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    return (sampler or defaults).replace(**{**options, **{k: v for k, v in named.items() if v is not None}})


def run_settings(defaults: SamplerConfig, rows: int, *, num_inference_steps: int | None,
                 guidance_scale: float | None, generator: Any, batch_size: Any, output_type: Any,
                 callback: StepCallback | None, sampler: SamplerConfig | None,
                 options: Mapping[str, Any]) -> RunSettings:
    """The options every sampling task takes, checked for a call making `rows` outputs (the
    generator once here: one, or one per output)."""
    if rows > MAX_OUTPUTS:
        raise ValueError(f"{rows} outputs in one call; at most {MAX_OUTPUTS} (they are all held in memory): "
                         "call again for more, or use `medim generate`, which writes any number to disk")
    check_int(batch_size, "batch_size", minimum=1, allow_none=True)
    check_choice(output_type, "output_type", OUTPUT_TYPES)
    check_generator(generator, rows)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    config = sampler_settings(defaults, sampler, options, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale)
    return RunSettings(config, batch_size, generator, output_type, callback)


def row_generators(generator: GeneratorInput, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per output, so a row's sample does not depend on how outputs are chunked.
    A single generator (or None: torch's global RNG) seeds the per-output ones."""
    if isinstance(generator, (list, tuple)):
        return list(generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (n,), generator=generator, device=gen_device).tolist()
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t[-1:].expand(rows, *t.shape[1:])])


def run_chunks(rt: Runtime, task: tasks.TaskInputs, condition: Mapping[str, torch.Tensor],
               settings: RunSettings) -> tuple[torch.Tensor, int]:
    """Sample `task` in chunks of `settings.batch_size` rows with one generator per row; returns
    the final states [B, N] and the network evaluations spent."""
    n, device, denoiser = task.x.shape[0], rt.device, rt.denoiser
    size = settings.batch_size or n
    generators = row_generators(settings.generator, n, device)
    x, known = task.x.to(device), task.known.to(device)
    condition = {k: v.to(device) for k, v in condition.items()}
    chunks = range(0, n, size)
    bar = tqdm(total=len(chunks) * settings.config.num_inference_steps, desc="MeDiM", **rt.progress)

    def on_step(step: int, t: float, tokens: torch.Tensor) -> None:
        bar.update(1)
        if settings.callback is not None:
            settings.callback(step, t, tokens)

    out, nfe = [], 0
    with torch.inference_mode(), bar:
        for start in chunks:
            rows = slice(start, start + size)
            xs, ks, gens = x[rows], known[rows], generators[rows]
            kwargs = {k: v[rows] for k, v in condition.items()}
            # A compiled denoiser sees one batch size: a short last chunk is filled with copies of
            # its last row (own generators, dropped after), so it compiles nothing new.
            extra = size - xs.shape[0] if denoiser.compiled else 0
            if extra:
                xs, ks, kwargs = _pad(xs, extra), _pad(ks, extra), {k: _pad(v, extra) for k, v in kwargs.items()}
                gens = gens + [torch.Generator(device).manual_seed(0) for _ in range(extra)]
            result = sample(denoiser, xs, ks, segments=rt.layout.segments, mask_id=rt.layout.mask_id,
                            config=settings.config, generator=gens, model_kwargs=kwargs, callback=on_step, check=False)
            out.append(result.tokens[: size - extra])
            nfe += result.nfe
    return torch.cat(out), nfe


# CPU kernels (oneDNN convolutions, channels-last GroupNorm) sum in an order that depends on the
# batch size and the thread count (GPU libraries pick kernels by shape); decoded pixels are rounded
# to 8 bits, so another split would move some pixels by one level, and near-ties of the code
# search could pick another code. One image at a time, on one CPU thread, makes each output a
# function of its own input only: chunking, resuming and sharding a run (`medim generate` under
# torchrun, one thread per process) give the same bytes. Cost: benchmarks/bench_generate.py.
_ONE_THREAD = threading.Lock()


def per_image(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """`fn` applied to every row of `batch` on its own (`fn` takes and returns a batch of one),
    with one intra-op thread when `device` is the CPU; the results concatenated."""
    if device.type != "cpu":
        return torch.cat([fn(row[None]) for row in batch])
    with _ONE_THREAD:  # set_num_threads is process-wide: concurrent calls must not interleave
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.cat([fn(row[None]) for row in batch])
        finally:
            torch.set_num_threads(threads)


def image_list(images: Any, name: str = "images") -> list[Image.Image]:
    """One image or a non-empty list of them, as RGB PIL images (`load_image` checks each)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name} is empty: pass at least one image")
        return [load_image(image) for image in images]
    return [load_image(images)]


def encode_images(rt: Runtime, rgb: list[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int]], torch.LongTensor]:
    """Pixels [B, 3, S, S] in [-1, 1] (padded to square, resized to the VQGAN's resolution), the
    original sizes (the medim-v1 size condition) and the VQ codes [B, image_len] on `rt.device`
    (one image at a time: `per_image`)."""
    pixels, sizes = preprocess(rgb, size=rt.image_resolution, return_sizes=True)
    codes = per_image(lambda p: rt.vqgan.encode(p.to(rt.vqgan.device)), pixels, rt.vqgan.device)
    return pixels, sizes, codes.to(rt.device)


def decode_images(rt: Runtime, tokens: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor:
    """The image part of final states as `output_type`: VQ codes ("tokens"), [0, 1] pixels ("pt")
    or RGB PIL images ("pil"). A sample's pixels depend only on its codes (`per_image`)."""
    image = rt.layout.image_segment
    codes = tokens[:, image.start : image.stop] - image.vocab_start
    if output_type == "tokens":
        return codes
    pixels = per_image(lambda c: rt.vqgan.decode(c).float().cpu(), codes, rt.vqgan.device)
    return postprocess(pixels) if output_type == "pil" else (pixels + 1) / 2


def shown_inputs(rgb: list[Image.Image], pixels: torch.Tensor, codes: torch.Tensor,
                 output_type: str) -> list[Image.Image] | torch.Tensor:
    """Input images as an output shows them: RGB PIL images ("pil"), the model's input pixels in
    [0, 1] ("pt") or their VQ codes ("tokens")."""
    return {"pil": rgb, "pt": (pixels + 1) / 2, "tokens": codes}[output_type]

"""The three generation tasks of the pipeline (`GenerationMixin`: text_to_image, image_to_report,
generate_pairs), their output, and what they share: input checks, the sampler settings of a call,
one generator per output, chunked sampling with a progress bar, the VQGAN one image at a time.

The checks run once, at the pipeline's public edge, before any compute; what is below them
(layout, tasks, sampler) takes their output as valid.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from medim.data.images import ImageInput, load_image, postprocess, preprocess
from medim.diffusion import tasks
from medim.diffusion.config import SamplerConfig
from medim.diffusion.sampler import check_generator, sample
from medim.models.denoiser import ModelDenoiser

__all__ = ["MeDiMOutput", "GenerationMixin", "OUTPUT_TYPES", "check_text", "check_prompts", "check_image_size",
           "check_call", "sampler_settings", "row_generators", "run_chunks", "prompt_task", "per_image",
           "image_list", "encode_images", "decode_images"]

OUTPUT_TYPES = ("pil", "pt", "tokens")


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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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


def check_image_size(image_size: Any) -> tuple[int, int]:
    """(width, height) as positive ints: the size the medim-v1 layout tells the model."""
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(map(_positive_int, image_size))):
        raise ValueError(f"image_size must be (width, height) positive ints, got {image_size!r}")
    return tuple(image_size)


def check_call(rows: int, batch_size: Any, output_type: Any, generator: Any, callback: Any) -> None:
    """The options every task takes, for a call making `rows` outputs (the sampler settings are
    checked by `sampler_settings`)."""
    if batch_size is not None and not _positive_int(batch_size):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
    check_generator(generator, rows)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")


def sampler_settings(defaults: SamplerConfig, sampler: SamplerConfig | None, options: Mapping[str, Any], *,
                     num_inference_steps: int | None, guidance_scale: float | None) -> SamplerConfig:
    """The call's settings: `sampler` (or the pipeline's `defaults`), then the `SamplerConfig`
    fields in `options`, then the two named ones when not None. Validated here (an unknown name or
    a bad value raises ValueError), before any compute."""
    if sampler is not None and not isinstance(sampler, SamplerConfig):
        raise TypeError(f"sampler must be a medim.diffusion.SamplerConfig or None, got {type(sampler).__name__}")
    named = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    return (sampler or defaults).replace(**{**options, **{k: v for k, v in named.items() if v is not None}})


def row_generators(generator: Any, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per output, so a row's sample does not depend on how outputs are chunked.
    A single generator (or None: torch's global RNG) seeds the per-output ones."""
    if isinstance(generator, (list, tuple)):
        return list(generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (n,), generator=generator, device=gen_device).tolist()
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def prompt_task(layout: Any, tokenizer: Any, prompts: list[str], device: torch.device) -> tasks.TaskInputs:
    """Report beginnings known, everything else unknown. A prompt's tokens are its encoded report
    up to padding or the end-of-report id (which must stay free to move)."""
    ids = layout.encode_reports(tokenizer, prompts)
    real = ids != layout.pad_id
    if layout.report_end_id is not None:
        real &= ids != layout.report_end_id
    lengths = real.long().cumprod(1).sum(1)
    return tasks.pair_from_prompt(layout, ids.to(device), lengths)


def run_chunks(pipe: Any, task: tasks.TaskInputs, condition: dict[str, torch.Tensor], config: SamplerConfig,
               batch_size: int | None, generator: Any, callback: Callable[..., None] | None) -> tuple[torch.Tensor, int]:
    """Sample `task` in chunks of `batch_size` rows with one generator per row; returns the final
    states [B, N] and the network evaluations spent."""
    n = task.x.shape[0]
    size = batch_size or n
    generators = row_generators(generator, n, pipe.device)
    x, known = task.x.to(pipe.device), task.known.to(pipe.device)
    condition = {k: v.to(pipe.device) for k, v in condition.items()}
    chunks = range(0, n, size)
    bar = tqdm(total=len(chunks) * config.num_inference_steps, desc="MeDiM", **pipe._progress_bar_config)

    # Raw logits (the sampler normalises them itself), context-cached steps, or the forward
    # `pipe.compile()` made (medim/models/denoiser.py).
    compiled = getattr(pipe, "_compiled_denoiser", None)
    denoiser = compiled if compiled is not None and compiled.model is pipe.model else ModelDenoiser(pipe.model)

    def on_step(step: int, t: float, tokens: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback(pipe, step, t, tokens)

    def pad(t: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([t, t[-1:].expand(rows, *t.shape[1:])])

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
                xs, ks, kwargs = pad(xs, extra), pad(ks, extra), {k: pad(v, extra) for k, v in kwargs.items()}
                gens = gens + [torch.Generator(pipe.device).manual_seed(0) for _ in range(extra)]
            result = sample(denoiser, xs, ks, segments=pipe.layout.segments, mask_id=pipe.layout.mask_id,
                            config=config, generator=gens, model_kwargs=kwargs, callback=on_step, check=False)
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


def encode_images(pipe: Any, rgb: list[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int]], torch.LongTensor]:
    """Pixels [B, 3, S, S] in [-1, 1] (padded to square, resized to the VQGAN's resolution), the
    original sizes (the medim-v1 size condition) and the VQ codes [B, image_len] on `pipe.device`
    (one image at a time: `per_image`)."""
    pixels, sizes = preprocess(rgb, size=pipe.image_resolution, return_sizes=True)
    codes = per_image(lambda p: pipe.vqgan.encode(p.to(pipe.vqgan.device)), pixels, pipe.vqgan.device)
    return pixels, sizes, codes.to(pipe.device)


def decode_images(pipe: Any, tokens: torch.Tensor, output_type: str) -> list[Image.Image] | torch.Tensor:
    """The image part of final states as `output_type`: VQ codes ("tokens"), [0, 1] pixels ("pt")
    or RGB PIL images ("pil"). A sample's pixels depend only on its codes (`per_image`)."""
    image = pipe.layout.image_segment
    codes = tokens[:, image.start : image.stop] - image.vocab_start
    if output_type == "tokens":
        return codes
    pixels = per_image(lambda c: pipe.vqgan.decode(c).float().cpu(), codes, pipe.vqgan.device)
    return postprocess(pixels) if output_type == "pil" else (pixels + 1) / 2


class GenerationMixin:
    """The three tasks of `MeDiMPipeline` (which provides model, vqgan, tokenizer, layout,
    sampler_config, image_resolution and device)."""

    def text_to_image(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> MeDiMOutput | tuple:
        """Generate one image per report.

        Args:
            prompts: reports (list of str); longer than the text slots -> truncated with a warning.
            image_size: (width, height) the model is told the image has (the medim-v1 size
                condition); the output has the VQGAN's resolution.
            num_inference_steps, guidance_scale: the sampler settings set most often (None: the
                pipeline's `sampler_config`).
            generator: one generator, or one per output. Outputs do not depend on `batch_size`.
            batch_size: outputs per forward batch (None: all at once).
            output_type: "pil", "pt" (float [B, 3, H, W] in [0, 1]) or "tokens" (VQ codes).
            return_dict: False returns `(images, reports)`.
            callback_on_step_end: `fn(pipe, step, t, tokens)` after every step of every chunk.
            sampler: a `medim.diffusion.SamplerConfig` to start from instead of the pipeline's.
            **sampler_options: any other `SamplerConfig` field (`strategy`, `temperature`, `top_k`,
                `top_p`, `schedule`, `cache_interval`, ...), e.g. `**medim.diffusion.FAST_OPTIONS`.

        Example:
            >>> pipe.text_to_image(["A small lucent lesion in the left lower zone."], num_inference_steps=16).images[0]
        """
        prompts = check_prompts(prompts)
        size = check_image_size(image_size)
        check_call(len(prompts), batch_size, output_type, generator, callback_on_step_end)
        config = sampler_settings(self.sampler_config, sampler, sampler_options,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        task = tasks.text_to_image(self.layout, self.layout.encode_reports(self.tokenizer, prompts))
        condition = self.layout.condition(self.tokenizer, [size] * len(prompts))
        tokens, nfe = run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        out = MeDiMOutput(decode_images(self, tokens, output_type), list(prompts), tokens, nfe)
        return out if return_dict else (out.images, out.reports)

    def image_to_report(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> MeDiMOutput | tuple:
        """Write one report per image.

        Args:
            images: PIL images (any mode: grayscale and 16-bit X-rays are converted), paths,
                numpy arrays or tensors (see `medim.data.images.load_image`). They are padded to
                square and resized to the VQGAN's resolution; the original size is the medim-v1
                size condition.
            prompt: optional beginning every report starts with (one str, or one per image),
                kept fixed while the rest is generated.
            Other arguments: as for `text_to_image`. `out.images` are the inputs as RGB PIL images
            ("pil"), the model's input pixels in [0, 1] ("pt") or their VQ codes ("tokens").

        Example:
            >>> pipe.image_to_report(["phantom.png"], prompt="Frontal chest radiograph.").reports
        """
        rgb = image_list(images)
        prompts = None
        if prompt is not None:
            if isinstance(prompt, str):
                prompts = [check_text(prompt, "prompt")] * len(rgb)
            else:
                prompts = check_prompts(prompt, "prompt")
            if len(prompts) != len(rgb):
                raise ValueError(f"prompt: give one str or one per image ({len(rgb)}), got {len(prompts)}")
        check_call(len(rgb), batch_size, output_type, generator, callback_on_step_end)
        config = sampler_settings(self.sampler_config, sampler, sampler_options,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        pixels, sizes, codes = encode_images(self, rgb)
        task = tasks.image_to_report(self.layout, codes)
        if prompts is not None:
            given = prompt_task(self.layout, self.tokenizer, prompts, self.device)
            task = tasks.TaskInputs(torch.where(given.known, given.x, task.x), given.known | task.known)
        condition = self.layout.condition(self.tokenizer, sizes)
        tokens, nfe = run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        shown = {"pil": rgb, "pt": (pixels + 1) / 2, "tokens": codes}[output_type]
        out = MeDiMOutput(shown, self.layout.decode_reports(self.tokenizer, tokens), tokens, nfe)
        return out if return_dict else (out.images, out.reports)

    def generate_pairs(
        self,
        prompts: Sequence[str],
        *,
        num_pairs_per_prompt: int = 1,
        image_size: tuple[int, int] = (512, 512),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., None] | None = None,
        sampler: SamplerConfig | None = None,
        **sampler_options: Any,
    ) -> MeDiMOutput | tuple:
        """Generate image-report pairs together; each report starts with its prompt ("" for none).

        Outputs are prompt-major: prompt 0's `num_pairs_per_prompt` pairs, then prompt 1's, ...
        A list of generators needs one per output (`len(prompts) * num_pairs_per_prompt`).
        Other arguments: as for `text_to_image`.

        Example:
            >>> out = pipe.generate_pairs(["Frontal chest radiograph."], num_pairs_per_prompt=4)
            >>> out.images[0], out.reports[0]
        """
        if isinstance(num_pairs_per_prompt, bool) or not isinstance(num_pairs_per_prompt, int) or num_pairs_per_prompt < 1:
            raise ValueError(f"num_pairs_per_prompt must be an int >= 1, got {num_pairs_per_prompt!r}")
        prompts = [p for p in check_prompts(prompts, allow_empty_text=True) for _ in range(num_pairs_per_prompt)]
        size = check_image_size(image_size)
        check_call(len(prompts), batch_size, output_type, generator, callback_on_step_end)
        config = sampler_settings(self.sampler_config, sampler, sampler_options,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        task = prompt_task(self.layout, self.tokenizer, prompts, self.device)
        condition = self.layout.condition(self.tokenizer, [size] * len(prompts))
        tokens, nfe = run_chunks(self, task, condition, config, batch_size, generator, callback_on_step_end)
        out = MeDiMOutput(decode_images(self, tokens, output_type),
                          self.layout.decode_reports(self.tokenizer, tokens), tokens, nfe)
        return out if return_dict else (out.images, out.reports)

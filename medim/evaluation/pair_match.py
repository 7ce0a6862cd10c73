"""Image-report match judged by a vision-language model, as the release's `pair_metric.py` does it
with Qwen2-VL-7B-Instruct: one question per pair, a number in [0, 1] read from the answer.

Everything goes through transformers' Qwen2-VL classes (no qwen_vl_utils): the PIL image processor
(the release's; the torchvision one resizes with other code), the processor's chat template and
token expansion, greedy `generate`. Weights come from a local folder or the Hub cache.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from medim.data.images import load_image
from medim.utils.checks import check_int
from medim.utils.hub import HubOptions

__all__ = ["DEFAULT_JUDGE", "PROMPT", "SCORE_PATTERN", "VLMJudge", "PairMatchResult", "load_judge", "pair_match",
           "parse_score"]

logger = logging.getLogger(__name__)

DEFAULT_JUDGE = "Qwen/Qwen2-VL-7B-Instruct"
PROMPT = (
    "Report: {report}. Please give a matching score from 0 (mismatch) to 1 (perfect match). "
    "Only output a decimal number."
)
SCORE_PATTERN = r"0(\.\d+)?|1(\.0+)?"
# The release's processor bounds (its AutoProcessor kwargs): 256 to 1280 visual tokens of 28x28 px.
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28
# qwen_vl_utils' own resize, which the release's images went through before the processor: sides
# rounded to multiples of 28, within 4 and 16384 tokens.
_FACTOR, _UTILS_MIN_PIXELS, _UTILS_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28


def parse_score(answer: str, pattern: str = SCORE_PATTERN) -> float | None:
    """The first match of `pattern` in `answer` as a float, or None (the release's rule). With the
    default pattern "Score: 1.0" -> 1.0, "0.8" -> 0.8, "n/a" -> None; note "10" -> 1.0, "2" -> None.

    Example:
        >>> parse_score("The score is 0.75.")
        0.75
    """
    match = re.search(pattern, answer)
    if match is None:
        return None
    try:
        return float(match.group(0))
    except ValueError:
        return None


def _check_size(image: str | os.PathLike | Image.Image, i: int) -> None:
    """Read only the header of a file: is it an image Qwen2-VL takes (aspect ratio under 200)?"""
    try:
        if isinstance(image, Image.Image):
            w, h = image.size
        else:
            with Image.open(image) as opened:
                w, h = opened.size
    except (OSError, ValueError) as e:
        raise ValueError(f"image {i}: {image} is not an image file PIL can read") from e
    if min(w, h) < 1 or max(w, h) / min(w, h) > 200:
        raise ValueError(f"image {i} is {w}x{h}: Qwen2-VL needs an aspect ratio under 200")


def _release_resize(image: Image.Image) -> Image.Image:
    """qwen_vl_utils' `fetch_image` resize: each side to the nearest multiple of 28, scaled (keeping
    the aspect ratio) into [4, 16384] x 28 x 28 pixels, PIL bicubic."""
    h, w = image.height, image.width
    h_bar, w_bar = (max(_FACTOR, round(s / _FACTOR) * _FACTOR) for s in (h, w))
    if h_bar * w_bar > _UTILS_MAX_PIXELS:
        beta = math.sqrt(h * w / _UTILS_MAX_PIXELS)
        h_bar, w_bar = (math.floor(s / beta / _FACTOR) * _FACTOR for s in (h, w))
    elif h_bar * w_bar < _UTILS_MIN_PIXELS:
        beta = math.sqrt(_UTILS_MIN_PIXELS / (h * w))
        h_bar, w_bar = (math.ceil(s * beta / _FACTOR) * _FACTOR for s in (h, w))
    return image.resize((w_bar, h_bar), Image.Resampling.BICUBIC)


@functools.cache
def _processor_class():
    from transformers import Qwen2VLProcessor

    class ImageTextQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video half, whose processor needs torchvision."""

        attributes = ["image_processor", "tokenizer"]  # transformers 4.x reads this list

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # transformers 5 reads the sub-processors from this signature; the video slot is dropped.
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageTextQwen2VLProcessor


def _image_processor_class():
    import transformers

    # The PIL implementation (transformers 5: ...Pil; 4.x: the slow class) is the release's.
    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def _chat_template(judge: str, tokenizer, hub: dict) -> str:
    """The processor's chat template (chat_template.jinja, or the legacy chat_template.json), else the
    tokenizer's."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(judge, name, _raise_exceptions_for_missing_entries=False, **hub)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise ValueError(f"judge {judge!r} has no chat template (chat_template.jinja/.json or in its tokenizer)")


@dataclass
class VLMJudge:
    """A loaded Qwen2-VL-compatible judge: the model, its processor and the name it was loaded from."""

    model: Any
    processor: Any
    name: str

    @property
    def device(self) -> torch.device:
        return self.model.device


def load_judge(
    judge: str | os.PathLike = DEFAULT_JUDGE,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    hub: HubOptions | None = None,
) -> VLMJudge:
    """Load a Qwen2-VL(-compatible) judge from a local folder or a Hub id (the Hub cache with
    `HF_HUB_OFFLINE=1`). `dtype` defaults to float16 on CUDA (the release's) and float32 on CPU;
    `min_pixels`/`max_pixels` bound the image size the processor resizes to (release: 256 and
    1280 tokens of 28x28 pixels).

    Example:
        >>> judge = load_judge("Qwen/Qwen2-VL-7B-Instruct", device="cuda")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    check_int(min_pixels, "min_pixels", minimum=1)
    check_int(max_pixels, "max_pixels", minimum=1)
    if min_pixels > max_pixels:
        raise ValueError(f"need min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    judge = str(judge)
    options = (hub or HubOptions()).kwargs()
    tokenizer = AutoTokenizer.from_pretrained(judge, trust_remote_code=False, **options)
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    image_processor = _image_processor_class().from_pretrained(
        judge, min_pixels=min_pixels, max_pixels=max_pixels, **options
    )
    processor = _processor_class()(image_processor, tokenizer, chat_template=_chat_template(judge, tokenizer, options))
    model = Qwen2VLForConditionalGeneration.from_pretrained(judge, dtype=dtype, **options).to(device).eval()
    return VLMJudge(model, processor, judge)


@dataclass
class PairMatchResult:
    """What `pair_match` returns: the mean over scored pairs (None if none was), per-pair scores
    (None where the answer held no number) and answers, the counts, the judge and the prompt."""

    mean: float | None
    scores: list[float | None]
    answers: list[str]
    num_pairs: int
    num_scored: int
    num_unparsable: int
    judge: str
    prompt: str

    def to_dict(self, per_pair: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not per_pair:
            del out["scores"], out["answers"]
        return out


def _generation_config(model, max_new_tokens: int):
    # Greedy. The release sampled with Qwen2-VL's generation_config (top_k=1: the argmax), keeping
    # its repetition penalty (1.05), which this keeps too.
    config = copy.deepcopy(model.generation_config)
    # Neutral values, not None: generate() would refill None from the judge's sampling settings.
    config.do_sample, config.temperature, config.top_p, config.top_k = False, 1.0, 1.0, 50
    config.max_new_tokens = max_new_tokens
    return config


def pair_match(
    images: Sequence[str | os.PathLike | Image.Image],
    reports: Sequence[str],
    *,
    judge: str | os.PathLike | VLMJudge = DEFAULT_JUDGE,
    prompt: str = PROMPT,
    pattern: str = SCORE_PATTERN,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    hub: HubOptions | None = None,
    progress: bool = True,
) -> PairMatchResult:
    """Ask the judge how well each report matches its image; score = first match of `pattern` in
    the answer (None if there is none); mean over the scored pairs.

    Args:
        images: paths or PIL images (converted to RGB), one per report.
        reports: report texts (stripped, as the release strips its text files).
        judge: a Hub id or local folder of a Qwen2-VL-compatible model, or a `load_judge` result.
        prompt: the user text after the image; `{report}` is replaced by the report.
        pattern: regular expression whose first match is the score.
        batch_size: pairs per `generate` call (left-padded; the release asked one at a time).
        max_new_tokens: answer length limit (release: 128).
        device, dtype, hub: for loading `judge` by name (see `load_judge`), after every input is checked.
        progress: show a progress bar.

    Example:
        >>> out = pair_match(["a.png", "b.png"], ["No acute findings.", "Left effusion."])  # doctest: +SKIP
        >>> out.mean, out.scores  # doctest: +SKIP
    """
    _check_inputs(images, reports, prompt, pattern)
    check_int(batch_size, "batch_size", minimum=1)
    check_int(max_new_tokens, "max_new_tokens", minimum=1)
    if not isinstance(judge, VLMJudge):
        judge = load_judge(judge, device=device, dtype=dtype, hub=hub)
    answers = _answers(judge, images, reports, prompt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       progress=progress)
    scores = [parse_score(a, pattern) for a in answers]
    valid = [s for s in scores if s is not None]
    mean = sum(valid) / len(valid) if valid else None
    unparsable = len(scores) - len(valid)
    if unparsable:
        logger.warning("%d of %d answers hold no score and are left out of the mean", unparsable, len(scores))
    return PairMatchResult(mean, scores, answers, len(scores), len(valid), unparsable, judge.name, prompt)


def _check_inputs(images, reports, prompt: str, pattern: str) -> None:
    """Every pair's types, files and image size, the prompt's `{report}` slot and the pattern, before
    the judge loads."""
    if isinstance(images, (str, os.PathLike)) or isinstance(reports, str):
        raise TypeError("images and reports must be sequences (one entry per pair), not a single path or string")
    if len(images) != len(reports) or not images:
        raise ValueError(f"need as many images as reports, at least one: got {len(images)} and {len(reports)}")
    for i, (image, report) in enumerate(zip(images, reports)):
        if not isinstance(report, str):
            raise TypeError(f"report {i} is {type(report).__name__}, expected str")
        if not isinstance(image, (str, os.PathLike, Image.Image)):
            raise TypeError(f"image {i} is {type(image).__name__}, expected a path or a PIL image")
        if not isinstance(image, Image.Image) and not Path(image).is_file():
            raise FileNotFoundError(f"image {i}: {image} does not exist")
        _check_size(image, i)
    if "{report}" not in prompt:
        raise ValueError("prompt must contain {report}, where each report goes")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {e}") from e


def _answers(judge: VLMJudge, images, reports, prompt: str, *, batch_size: int, max_new_tokens: int,
             progress: bool) -> list[str]:
    """The judge's answer for every pair: `batch_size` pairs per greedy, left-padded `generate` call."""
    processor, model = judge.processor, judge.model
    generation_config = _generation_config(model, max_new_tokens)
    answers: list[str] = []
    for start in tqdm(range(0, len(images), batch_size), desc="pair match", unit="batch", disable=not progress):
        batch_images = [_release_resize(load_image(i)) for i in images[start : start + batch_size]]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [
                    {"type": "image"}, {"type": "text", "text": prompt.replace("{report}", report.strip())},
                ]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for report in reports[start : start + batch_size]
        ]
        inputs = processor(text=texts, images=batch_images, padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=generation_config)
        answers += processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
    return answers

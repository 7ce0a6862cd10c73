"""What `medim demo` does with a model: a few results of each task, as captioned image grids, a
reports file and a summary of which results the phantom readers find right."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from medim.data.synthetic import make_dataset, parse_report, read_image
from medim.demo.settings import DEMO_NAME, DEMO_PROMPTS, EVAL_SEED, IMAGE_SIZE, PAIR_PROMPTS

__all__ = ["run_demo"]


def _grid(images: list[Image.Image], captions: list[str], scale: int = 3) -> Image.Image:
    """Images side by side, each with its caption wrapped underneath."""
    side = IMAGE_SIZE * scale
    lines = [textwrap.wrap(c, 26) for c in captions]
    text_h = 12 * max(len(c) for c in lines) + 8
    sheet = Image.new("RGB", (side * len(images), side + text_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, wrapped) in enumerate(zip(images, lines)):
        sheet.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (i * side, 0))
        for j, line in enumerate(wrapped):
            draw.text((i * side + 4, side + 4 + 12 * j), line, fill="black")
    return sheet


def run_demo(out: str | os.PathLike = "medim-demo", num_inference_steps: int | None = None, seed: int = 0,
             overwrite: bool = False, model: str | os.PathLike = DEMO_NAME) -> dict:
    """Load the shipped model (or `model`) and write a few results of each task to `out`:
    text_to_image.png, image_to_report.png (+ reports.txt) and pairs.png, plus summary.json.
    Sampling uses the model's saved settings (`num_inference_steps` overrides their step count).
    Returns the summary (also printed by `medim demo`).

    Example:
        >>> summary = run_demo("medim-demo")
        >>> summary["text_to_image"]["image_matches_prompt"]
    """
    from medim.pipelines.pipeline import MeDiMPipeline

    start = time.perf_counter()
    pipe = MeDiMPipeline.from_pretrained(model)
    if num_inference_steps is None:
        num_inference_steps = pipe.sampler_config.num_inference_steps
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace its files")
    out.mkdir(parents=True, exist_ok=True)
    common = dict(num_inference_steps=num_inference_steps)

    def gens(k):
        return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(k)]

    t2i = pipe.text_to_image(list(DEMO_PROMPTS), generator=gens(len(DEMO_PROMPTS)), **common)
    _grid(t2i.images, list(DEMO_PROMPTS)).save(out / "text_to_image.png")
    t2i_ok = [read_image(im) == parse_report(p, strict=False) for im, p in zip(t2i.images, DEMO_PROMPTS)]

    phantoms = make_dataset(4, seed=EVAL_SEED + 1, size=IMAGE_SIZE)
    i2r = pipe.image_to_report([im for im, _, _ in phantoms], generator=gens(4), **common)
    _grid([im for im, _, _ in phantoms], i2r.reports).save(out / "image_to_report.png")
    (out / "reports.txt").write_text("".join(f"phantom {i}: {r}\n  truth: {t}\n" for i, (r, (_, t, _))
                                             in enumerate(zip(i2r.reports, phantoms))))
    i2r_ok = [parse_report(r, strict=False) == spec for r, (_, _, spec) in zip(i2r.reports, phantoms)]

    pairs = pipe.generate_pairs([PAIR_PROMPTS[0]], num_pairs_per_prompt=4, generator=gens(4), **common)
    _grid(pairs.images, pairs.reports).save(out / "pairs.png")
    pair_ok = [read_image(im) == parse_report(r, strict=False) for im, r in zip(pairs.images, pairs.reports)]

    summary = {
        "output_dir": str(out.resolve()),
        "text_to_image": {"prompts": list(DEMO_PROMPTS), "image_matches_prompt": t2i_ok},
        "image_to_report": {"reports": i2r.reports, "report_matches_image": i2r_ok},
        "pairs": {"reports": pairs.reports, "image_matches_report": pair_ok},
        "num_inference_steps": num_inference_steps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

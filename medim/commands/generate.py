"""`medim generate {pairs,image,report}`: batch generation to a folder, resumable.

Every sample gets an index (prompt-major: prompt 0 copy 0, prompt 0 copy 1, ...) and the seed
`--seed + index`, so a run that was stopped and started again produces exactly the samples it would
have produced in one go. Finished samples are listed in `manifest.jsonl` (one JSON object a line,
written after the sample's files); a rerun skips them and never rewrites their files.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
from pathlib import Path

from medim.commands.common import add_hub_arguments, hub_options
from medim.task_names import TASKS

HELP = "generate images, reports or image-report pairs in batch (resumable)"

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
# Settings that change what a sample looks like: a resumed run must use the same ones.
SETTING_KEYS = (
    "task", "model", "loader", "revision", "num_inference_steps", "guidance_scale", "strategy",
    "temperature", "top_k", "top_p", "image_size", "prompt", "dtype", "seed", "num_per_prompt",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "task", choices=sorted(TASKS),
        help="pairs: image + report from a report prompt; image: image from a report; "
        "report: report from an image",
    )
    parser.add_argument(
        "--model", default="JiaMao/medim_ckpts",
        help="Hub repo id or local directory: a saved MeDiMPipeline (model_index.json) or the "
        "released MeDiM checkpoint",
    )
    parser.add_argument(
        "--loader", choices=("auto", "pretrained", "original"), default="auto",
        help="how to read --model: 'pretrained' = MeDiMPipeline.from_pretrained, 'original' = "
        "MeDiMPipeline.from_original (released checkpoint), 'auto' = pretrained when --model "
        "holds a model_index.json",
    )
    add_hub_arguments(parser, "--model")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; resumed if it exists)")
    parser.add_argument(
        "--prompts", type=Path, default=None,
        help="text file, one prompt a line (blank lines skipped); reports for 'image', report "
        "beginnings for 'pairs'",
    )
    parser.add_argument(
        "--images", nargs="+", default=None,
        help="input images or glob patterns (quote them), for 'report'",
    )
    parser.add_argument(
        "--prompt", default=None,
        help="'report' only: a beginning every report starts with (e.g. the dataset's fixed prefix)",
    )
    parser.add_argument("--num-per-prompt", type=int, default=1, help="samples per prompt or image")
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward batch")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale, 0 = off (default: the model's)")
    parser.add_argument("--strategy", default=None, help="sampler strategy: maskgit, threshold or ddpm (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, off)")
    parser.add_argument(
        "--image-size", default="512x512",
        help="WIDTHxHEIGHT given to the model as the image size condition when generating images",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    if width < 1 or height < 1:
        raise SystemExit(f"--image-size must be positive, got {text!r}")
    return width, height


def _inputs(args: argparse.Namespace) -> list[str]:
    """The prompts (image, pairs) or image paths (report) of the run, before copies."""
    if args.task == "report":
        if args.images is None:
            raise SystemExit("medim generate report needs --images (files or quoted glob patterns)")
        paths: list[str] = []
        for pattern in args.images:
            matched = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matched:
                raise SystemExit(f"--images: nothing matches {pattern!r}")
            paths.extend(matched)
        return paths
    if args.prompts is None:
        raise SystemExit(f"medim generate {args.task} needs --prompts (a text file, one prompt a line)")
    if not args.prompts.is_file():
        raise SystemExit(f"--prompts: {args.prompts} is not a file")
    prompts = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SystemExit(f"--prompts: {args.prompts} holds no prompt")
    return prompts


def _read_manifest(path: Path) -> dict[int, dict]:
    """Finished samples by index. A line cut short by an interruption is dropped (and the file
    rewritten without it) so appending continues on a clean line."""
    if not path.exists():
        return {}
    done: dict[int, dict] = {}
    text = path.read_text(encoding="utf-8")
    clean = True
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            done[int(entry["index"])] = entry
        except (ValueError, KeyError, TypeError):
            clean = False
    if not clean or (text and not text.endswith("\n")):
        from medim.hub import atomic_file

        logger.warning("%s: dropping an incomplete line left by an interrupted run", path)
        with atomic_file(path) as f:
            f.writelines(json.dumps(e) + "\n" for e in done.values())
    return done


def _load_pipeline(args: argparse.Namespace, dtype, device):
    from medim.hub import bundled_model_path, resolve_file
    from medim.pipeline import MeDiMPipeline

    hub = hub_options(args)
    loader = args.loader
    if loader == "auto" and bundled_model_path(args.model) is not None:
        loader = "pretrained"
    if loader == "auto":
        try:
            resolve_file(args.model, "model_index.json", hub=hub)
            loader = "pretrained"
        except Exception as err:  # missing locally or on the Hub: it is a released checkpoint
            logger.info("no model_index.json in %s (%s): reading it as the released checkpoint", args.model, err)
            loader = "original"
    load = MeDiMPipeline.from_pretrained if loader == "pretrained" else MeDiMPipeline.from_original
    return load(args.model, dtype=dtype, device=device, **hub.kwargs()), loader


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from medim.hub import atomic_file

    # Check everything that can be checked before the (slow) model load.
    if args.num_per_prompt < 1:
        raise SystemExit(f"--num-per-prompt must be >= 1, got {args.num_per_prompt}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompt is not None and args.task != "report":
        raise SystemExit("--prompt is for 'report'; give prompts to 'image' and 'pairs' with --prompts")
    image_size = _image_size(args.image_size)
    inputs = _inputs(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / MANIFEST
    done = _read_manifest(manifest)
    total = len(inputs) * args.num_per_prompt
    settings = dict(
        task=args.task, model=args.model, loader=args.loader, revision=args.revision,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, strategy=args.strategy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        image_size=list(image_size), prompt=args.prompt, dtype=str(dtype).removeprefix("torch."),
        seed=args.seed, num_per_prompt=args.num_per_prompt,
    )
    for entry in done.values():
        old = {k: entry.get("settings", {}).get(k) for k in SETTING_KEYS}
        if old != settings:
            changed = sorted(k for k in SETTING_KEYS if old[k] != settings[k])
            raise SystemExit(
                f"{args.out} holds samples made with other settings ({', '.join(changed)}); "
                "use the same options to resume or a new --out"
            )
        source = entry.get("source_image", entry.get("prompt"))
        if entry["index"] >= total or source != inputs[entry["index"] // args.num_per_prompt]:
            raise SystemExit(f"{args.out}: sample {entry['index']} was made from other inputs ({source!r}); "
                             "use the same --prompts/--images/--num-per-prompt to resume, or a new --out")
    pending = [i for i in range(total) if i not in done]
    logger.info("%d samples, %d already done in %s", total, total - len(pending), args.out)
    if not pending:
        print(f"all {total} samples already in {manifest}")
        return 0

    pipe, loader = _load_pipeline(args, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    sampling = dict(
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, strategy=args.strategy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
    )
    sampling = {k: v for k, v in sampling.items() if v is not None}
    method = getattr(pipe, TASKS[args.task])
    with tqdm(total=total, initial=total - len(pending), desc=f"medim generate {args.task}", unit="sample") as bar:
        for start in range(0, len(pending), args.batch_size):
            chunk = pending[start : start + args.batch_size]
            sources = [inputs[i // args.num_per_prompt] for i in chunk]
            generators = [torch.Generator(pipe.device).manual_seed(args.seed + i) for i in chunk]
            if args.task == "report":
                out = method(sources, prompt=args.prompt, generator=generators, **sampling)
            else:
                out = method(sources, generator=generators, image_size=image_size, **sampling)
            for n, i in enumerate(chunk):
                entry = dict(index=i, seed=args.seed + i, loader=loader, settings=settings)
                if args.task == "report":
                    entry["source_image"] = sources[n]
                else:
                    entry["prompt"] = sources[n]
                    entry["image"] = f"{i:06d}.png"
                    with atomic_file(args.out / entry["image"], "wb") as f:
                        out.images[n].save(f, format="PNG")
                if args.task != "image":
                    entry["report"] = f"{i:06d}.txt"
                    with atomic_file(args.out / entry["report"]) as f:
                        f.write(out.reports[n] + "\n")
                # The manifest line is written last: a sample without one is not finished.
                with open(manifest, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                bar.update(1)
    print(f"{total} samples in {args.out} (manifest: {manifest})")
    return 0

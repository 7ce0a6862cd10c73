"""`medim generate {pairs,image,report,inpaint}`: batch generation to a folder, resumable, on one
process or many (`torchrun --nproc_per_node N -m medim generate ...`).

Every sample gets an index (prompt-major: prompt 0 copy 0, prompt 0 copy 1, ...) and the seed
`--seed + index`, and its files depend on nothing else: not the batch size, not which process made
it, not how many there were. So a run that was stopped and started again, with any number of
processes, produces exactly the samples of one uninterrupted run. Finished samples are listed in
`manifest.jsonl` (one JSON object a line, written after the sample's files); a rerun skips them and
never rewrites their files. Under torchrun the k-th unfinished sample (in index order) goes to rank
k % world_size (`medim.utils.sharding.shard`); each rank appends to its own `manifest.rank<r>.jsonl`, and
when all are done rank 0 merges them into `manifest.jsonl` in index order.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from medim.commands.common import add_hub_arguments, expand_globs, hub_options, read_lines
from medim.commands.manifest import MANIFEST, collect, merge, part_path, prepare
from medim.utils.task_names import TASKS

HELP = "generate images, reports or image-report pairs in batch (resumable; torchrun for several processes)"

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
# Sampler options of the command line -> SamplerConfig fields, checked before the model loads.
SAMPLER_OPTIONS = (("--steps", "num_inference_steps", "steps"), ("--guidance-scale", "guidance_scale", "guidance_scale"),
                   ("--strategy", "strategy", "strategy"), ("--temperature", "temperature", "temperature"),
                   ("--top-k", "top_k", "top_k"), ("--top-p", "top_p", "top_p"),
                   ("--cache-interval", "cache_interval", "cache_interval"), ("--order", "order", "order"))
# Ranks finish at different times (shard sizes, model loads, a rank with nothing left to do), so
# the final barrier may wait long; a dead rank is noticed by torchrun, not by this timeout.
BARRIER_TIMEOUT_H = 72


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "task", choices=sorted(TASKS),
        help="pairs: image + report from a report prompt; image: image from a report; "
        "report: report from an image; inpaint: the masked region of an image regenerated under a report",
    )
    parser.add_argument(
        "--model", default="JiaMao/medim_ckpts",
        help="Hub repo id, local folder or bundled model name (medim-demo): a saved MeDiMPipeline "
        "(model_index.json) or the released MeDiM checkpoint",
    )
    parser.add_argument(
        "--loader", choices=("auto", "pretrained", "original"), default="auto",
        help="how to read --model: 'pretrained' = MeDiMPipeline.from_pretrained, 'original' = "
        "MeDiMPipeline.from_original (released checkpoint), 'auto' = pretrained for a bundled name or "
        "when --model holds a model_index.json, original for a folder holding model.safetensors "
        "(at the top or in checkpoint_<step>/) or a Hub repo without model_index.json",
    )
    add_hub_arguments(parser, "--model")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; resumed if it exists)")
    parser.add_argument(
        "--prompts", type=Path, default=None,
        help="UTF-8 text file, one prompt a line (blank lines skipped); reports for 'image', report "
        "beginnings for 'pairs'; for 'inpaint' (optional) the report of each image, or one line for all "
        "(without it the report is generated with the image)",
    )
    parser.add_argument(
        "--images", nargs="+", default=None,
        help="input images or glob patterns (quote them), for 'report' and 'inpaint'; an image that "
        "cannot be read is skipped and recorded in the manifest with an 'error'",
    )
    parser.add_argument(
        "--masks", nargs="+", default=None,
        help="'inpaint': mask images or glob patterns, one per image (in the images' order) or one for "
        "all; white = regenerate, each of its image's size",
    )
    parser.add_argument("--mask-dilation", type=int, default=0,
                        help="'inpaint': grow each mask by this many codes in every direction")
    parser.add_argument(
        "--prompt", default=None,
        help="'report' only: a beginning every report starts with (e.g. the dataset's fixed prefix)",
    )
    parser.add_argument("--num-per-prompt", type=int, default=1, help="samples per prompt or image")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"base seed; sample i uses seed + i, which must stay in [0, 2**63 - 1 = {MAX_SEED}]")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="samples per forward batch (per process); outputs do not depend on it")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale, 0 = off (default: the model's)")
    parser.add_argument("--strategy", default=None, help="sampler strategy: maskgit, threshold or ddpm (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, off)")
    parser.add_argument("--cache-interval", type=int, default=None,
                        help="context caching: refresh the cached keys/values every k steps (approximate; 1 = exact; "
                             "default: the model's, usually off; docs/sampling.md)")
    parser.add_argument("--order", default=None,
                        help="maskgit's image commit order: confidence or halton (default: the model's)")
    parser.add_argument(
        "--image-size", default="512x512",
        help="WIDTHxHEIGHT given to the model as the image size condition when generating images",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available; under torchrun each process "
                        "takes the GPU of its LOCAL_RANK)")


def _image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    if width < 1 or height < 1:
        raise SystemExit(f"--image-size must be positive, got {text!r}")
    return width, height


def _inputs(args: argparse.Namespace) -> list:
    """The inputs of the run, before copies: prompts (image, pairs), image paths (report), or
    [image, mask, prompt or None] (inpaint)."""
    if args.task in ("report", "inpaint"):
        if args.images is None:
            raise SystemExit(f"medim generate {args.task} needs --images (files or quoted glob patterns)")
        paths = expand_globs(args.images, "--images")
        return paths if args.task == "report" else _inpaint_inputs(args, paths)
    if args.prompts is None:
        raise SystemExit(f"medim generate {args.task} needs --prompts (a text file, one prompt a line)")
    return read_lines(args.prompts, "--prompts")


def _inpaint_inputs(args: argparse.Namespace, images: list[str]) -> list[list]:
    """[image, mask, prompt] per image; masks and prompts come one per image or one for all, and
    every mask must have its image's size (read before the model loads)."""
    from PIL import Image

    from medim.pipelines.editing import load_mask

    def per_image(values: list, option: str) -> list:
        if len(values) not in (1, len(images)):
            raise SystemExit(f"{option}: give one for all images or one per image ({len(images)}), got {len(values)}")
        return values * len(images) if len(values) == 1 else values

    if args.masks is None:
        raise SystemExit("medim generate inpaint needs --masks (one mask image per --images file, or one for all)")
    masks = per_image(expand_globs(args.masks, "--masks"), "--masks")
    prompts = per_image(read_lines(args.prompts, "--prompts"), "--prompts") if args.prompts else [None] * len(images)
    for i, (image, mask) in enumerate(zip(images, masks)):
        try:
            width, height = Image.open(image).size
            shape = load_mask(mask, f"--masks[{i}]").shape
        except (OSError, ValueError) as e:
            raise SystemExit(f"--masks[{i}] / --images[{i}]: {e}") from None
        if shape != (height, width):
            raise SystemExit(f"--masks[{i}]: {mask} is {shape[1]}x{shape[0]} but its image {image} is {width}x{height}")
    return [list(t) for t in zip(images, masks, prompts)]


def _check_options(args: argparse.Namespace, total: int) -> None:
    """Every option that can be checked without the model, each error naming its option."""
    from medim.diffusion.config import SamplerConfig
    from medim.pipelines.common import check_text

    if args.num_per_prompt < 1:
        raise SystemExit(f"--num-per-prompt must be >= 1, got {args.num_per_prompt}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompt is not None and args.task != "report":
        raise SystemExit("--prompt is for 'report'; give prompts to the other tasks with --prompts")
    if args.task != "inpaint" and (args.masks is not None or args.mask_dilation):
        raise SystemExit("--masks and --mask-dilation are for 'inpaint'")
    if args.mask_dilation < 0:
        raise SystemExit(f"--mask-dilation must be >= 0, got {args.mask_dilation}")
    if args.prompt is not None:
        try:
            check_text(args.prompt, "--prompt")
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.seed < 0 or args.seed + total - 1 > MAX_SEED:
        raise SystemExit(f"--seed: sample i uses seed + i, which must stay in [0, {MAX_SEED}]; with {total} samples "
                         f"--seed {args.seed} gives [{args.seed}, {args.seed + total - 1}]")
    for option, field, attribute in SAMPLER_OPTIONS:
        value = getattr(args, attribute)
        if value is not None:
            try:
                SamplerConfig(**{field: value})
            except ValueError as e:
                raise SystemExit(f"{option}: {e}") from None


def _resolve_loader(args: argparse.Namespace) -> str:
    """'pretrained' or 'original' for --model, decided before anything is loaded."""
    from medim.utils.hub import bundled_model_path, resolve_file

    name = str(args.model)
    try:
        if bundled_model_path(name) is not None:
            return "pretrained" if args.loader == "auto" else args.loader
    except FileNotFoundError as e:
        raise SystemExit(f"--model: {e}") from None
    path = Path(name).expanduser()
    # A Hub repo id is "name" or "owner/name"; anything else can only be meant as a local path.
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not path.exists():
            raise SystemExit(f"--model {name}: no such folder")
        if not path.is_dir():
            raise SystemExit(f"--model {name} is a file; give the folder that holds the model")
        if args.loader != "auto":
            return args.loader
        if (path / "model_index.json").is_file():
            return "pretrained"
        if (path / "model.safetensors").is_file() or any(path.glob("checkpoint_*/model.safetensors")):
            return "original"
        raise SystemExit(f"--model {name} holds neither a saved MeDiMPipeline (model_index.json) nor the released "
                         "checkpoint (model.safetensors at the top or in checkpoint_<step>/)")
    if args.loader != "auto":
        return args.loader
    try:
        resolve_file(name, "model_index.json", hub=hub_options(args))
        return "pretrained"
    except Exception as err:  # not in the repo, or not reachable: read it as the released checkpoint
        logger.info("no model_index.json in %s (%s): reading it as the released checkpoint", name, err)
        return "original"


def _device(args: argparse.Namespace, local_rank: int, world_size: int):
    import torch

    from medim.utils.checks import check_dtype_device

    text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        _, device = check_dtype_device(None, text)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {text}: CUDA is not available")
        if device.index is None and world_size > 1:
            if local_rank >= torch.cuda.device_count():
                raise SystemExit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                                 "start at most one process per GPU")
            device = torch.device("cuda", local_rank)
        if device.index is not None:  # "cuda" alone is the current device already
            torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------------- running


@contextlib.contextmanager
def _process_group(world_size: int) -> Iterator:
    """A barrier across the ranks (nothing else is exchanged, so gloo does it on every machine)."""
    if world_size == 1:
        yield lambda: None
        return
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=BARRIER_TIMEOUT_H))
    try:
        yield dist.barrier
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (torchrun stopping the other ranks when one fails, a scheduler's preemption) raises
    SystemExit, so the atomic writers remove their temporary files on the way out."""
    def stop(signum, frame):
        raise SystemExit(f"medim generate: stopped by signal {signum}; start it again to resume")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_images(paths: list[str], entries: list[dict]) -> list:
    """The images of a report chunk, None where the file cannot be read: that sample is skipped
    and its entry records the error, so one bad file does not stop a long run."""
    from PIL import Image

    from medim.data.images import load_image

    images = []
    for path, entry in zip(paths, entries):
        try:
            images.append(load_image(path))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            logger.warning("%s: skipped, the image cannot be read (%s)", path, err)
            entry["error"] = f"{type(err).__name__}: {err}"
            images.append(None)
    return images


def _generate(args, pipe, method, chunk: list[int], inputs: list[str], entries: list[dict], image_size, sampling):
    """Make the samples of `chunk` and write their files; fills in their manifest entries."""
    import torch

    from medim.utils.hub import atomic_file

    sources = [inputs[i // args.num_per_prompt] for i in chunk]
    keep = list(range(len(chunk)))
    for entry, source in zip(entries, sources):
        if args.task == "inpaint":
            entry["source_image"], entry["mask"], entry["prompt"] = source
        else:
            entry["source_image" if args.task == "report" else "prompt"] = source
    if args.task in ("report", "inpaint"):
        images = _load_images([s[0] if args.task == "inpaint" else s for s in sources], entries)
        keep = [n for n, image in enumerate(images) if image is not None]
        if not keep:
            return
        sources = [images[n] for n in keep]
    generators = [torch.Generator(pipe.device).manual_seed(args.seed + chunk[n]) for n in keep]
    if args.task == "report":
        out = method(sources, prompt=args.prompt, generator=generators, **sampling)
    elif args.task == "inpaint":
        given = [inputs[chunk[n] // args.num_per_prompt] for n in keep]
        prompts = [p for _, _, p in given]
        out = method(sources, [m for _, m, _ in given], None if prompts[0] is None else prompts,
                     mask_dilation=args.mask_dilation, generator=generators, **sampling)
    else:
        out = method(sources, generator=generators, image_size=image_size, **sampling)
    for k, n in enumerate(keep):
        entry, i = entries[n], chunk[n]
        if args.task != "report":
            entry["image"] = f"{i:06d}.png"
            with atomic_file(args.out / entry["image"], "wb") as f:
                out.images[k].save(f, format="PNG")
        if args.task not in ("image", "inpaint") or entry["prompt"] is None:
            entry["report"] = f"{i:06d}.txt"
            with atomic_file(args.out / entry["report"]) as f:
                f.write(out.reports[k] + "\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from medim.utils.sharding import current_shard, shard

    # Check everything that can be checked before the (slow) model load; every rank does the same.
    image_size = _image_size(args.image_size)
    inputs = _inputs(args)
    total = len(inputs) * max(args.num_per_prompt, 1)
    _check_options(args, total)
    where = current_shard()
    device = _device(args, where.local_rank, where.world_size)
    loader = _resolve_loader(args)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = dict(
        task=args.task, model=args.model, loader=args.loader, revision=args.revision,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, strategy=args.strategy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        cache_interval=args.cache_interval, order=args.order, image_size=list(image_size), prompt=args.prompt, dtype=str(dtype).removeprefix("torch."),
        seed=args.seed, num_per_prompt=args.num_per_prompt,
        mask_dilation=args.mask_dilation if args.task == "inpaint" else None,
    )
    with _stop_on_sigterm(), _process_group(where.world_size) as barrier:
        if where.rank == 0:
            prepare(args.out, settings, inputs, args.num_per_prompt)
        barrier()
        done = set(collect(args.out)[0])
        # Planned lazily: memory does not grow with the number of samples asked for.
        mine = shard((i for i in range(total) if i not in done), where.rank, where.world_size)
        count = len(range(where.rank, total - len(done), where.world_size))
        logger.info("%d samples, %d already done in %s; rank %d of %d makes %d", total, len(done), args.out,
                    where.rank, where.world_size, count)
        if count:
            pipe = _load_pipeline(args, loader, dtype, device)
            _make(args, pipe, mine, count, inputs, dict(loader=loader, settings=settings), image_size, where)
        barrier()
        if where.rank == 0:
            lines, dirty = collect(args.out)
            if dirty:
                merge(args.out, lines)
            skipped = sum("error" in json.loads(line) for line in lines.values())
            note = f"; {skipped} skipped (unreadable images, see 'error' in the manifest)" if skipped else ""
            print(f"{len(lines)} samples in {args.out} (manifest: {args.out / MANIFEST}){note}")
    return 0


def _make(args: argparse.Namespace, pipe, mine: Iterator[int], count: int, inputs: list[str], common: dict,
          image_size: tuple[int, int], where) -> None:
    """Make this rank's samples in chunks of --batch-size; each one's manifest line (with `common`)
    goes to the rank's part after its files."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    sampling = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, strategy=args.strategy,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    cache_interval=args.cache_interval, order=args.order)
    sampling = {k: v for k, v in sampling.items() if v is not None}
    method = getattr(pipe, TASKS[args.task])
    part = part_path(args.out, where.rank, where.world_size)
    who = f"rank {where.rank} of {where.world_size}" if where.world_size > 1 else "medim generate"
    with tqdm(total=count, desc=f"medim generate {args.task}", unit="sample", disable=where.rank != 0) as bar:
        while chunk := list(itertools.islice(mine, args.batch_size)):
            entries = [dict(index=i, seed=args.seed + i, **common) for i in chunk]
            try:
                _generate(args, pipe, method, chunk, inputs, entries, image_size, sampling)
            except Exception:
                logger.error("%s failed while making samples %s", who, chunk)
                raise
            for entry in entries:  # the manifest line is written last: without one, a sample is not finished
                with open(part, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            bar.update(len(chunk))


def _load_pipeline(args: argparse.Namespace, loader: str, dtype, device):
    from medim.pipelines.pipeline import MeDiMPipeline

    load = MeDiMPipeline.from_pretrained if loader == "pretrained" else MeDiMPipeline.from_original
    return load(args.model, dtype=dtype, device=device, **hub_options(args).kwargs())

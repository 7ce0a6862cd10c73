"""`medim generate {pairs,image,report,inpaint}`: batch generation to a folder, resumable, on one
process or many (`torchrun --nproc_per_node N -m medim generate ...`).

Every sample gets an index (prompt-major: prompt 0 copy 0, prompt 0 copy 1, ...) and the seed
`--seed + index`, and its files depend on nothing else: not the batch size, not which process made
it, not how many there were. So a run that was stopped and started again, with any number of
processes, produces exactly the samples of one uninterrupted run. Finished samples are listed in
`manifest.jsonl` (one JSON object a line, written after the sample's files); a rerun skips them and
never rewrites their files. Under torchrun the k-th unfinished sample (in index order) goes to rank
k % world_size (`medim.utils.sharding.shard`); each rank appends to its own `manifest.rank<r>.jsonl`, and
when all are done rank 0 merges them into `manifest.jsonl` in index order. A folder that is not
empty and holds no manifest medim wrote is refused, a resume compares the input files' contents, and
finished samples whose files are gone or empty are made again (`medim.commands.manifest`).
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

from medim.commands.common import (
    RELEASED_CHECKPOINT,
    SAMPLER_FIELDS,
    HelpFormatter,
    add_pipeline_arguments,
    add_sampler_arguments,
    expand_globs,
    load_pipeline,
    model_hub_options,
    pipeline_spec,
    read_lines,
    sampler_options,
    usage_errors,
)
from medim.commands.manifest import MANIFEST, MARK, merge, part_path, prepare, read
from medim.utils.task_names import TASKS

HELP = "generate images, reports, image-report pairs or inpainted images in batch (resumable; torchrun for many)"

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1
# Ranks finish at different times (shard sizes, model loads, a rank with nothing left to do), so
# the final barrier may wait long; a dead rank is noticed by torchrun, not by this timeout.
BARRIER_TIMEOUT_H = 72


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.epilog = ("Under torchrun each process takes the GPU of its LOCAL_RANK (unless --device names one) and "
                     "its share of the samples; the files are the same as one process makes.")
    parser.add_argument(
        "task", choices=sorted(TASKS),
        help="pairs: image + report from a report prompt; image: image from a report; "
        "report: report from an image; inpaint: the masked region of an image regenerated under a report",
    )
    add_pipeline_arguments(parser, default_model=RELEASED_CHECKPOINT)  # the released MeDiM
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
    parser.add_argument(
        "--image-size", default=None,
        help="WIDTHxHEIGHT the released (medim-v1) model is told the image has when generating images "
        "(default: the pipeline's, 512x512; other models have no size condition and ignore it)",
    )
    add_sampler_arguments(parser)


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size must look like 512x512 (WIDTHxHEIGHT), got {text!r}") from None
    if width < 1 or height < 1:
        raise SystemExit(f"--image-size must be positive, got {text!r}")
    return width, height


def _inputs(args: argparse.Namespace) -> list:
    """The inputs of the run, before copies: prompts (image, pairs), image paths (report), or
    [image, mask, prompt or None] (inpaint). Options of another task are refused first: `image
    --prompt "..."` is told what --prompt is for, not that --prompts is missing."""
    if args.prompt is not None and args.task != "report":
        raise SystemExit("--prompt is for 'report'; give prompts to the other tasks with --prompts")
    if args.task != "inpaint" and (args.masks is not None or args.mask_dilation):
        raise SystemExit("--masks and --mask-dilation are for 'inpaint'")
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
    from medim.data.images import read_image_file
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
            width, height = read_image_file(image, lambda opened: opened.size)  # DICOM too
            pixels = load_mask(mask, f"--masks {mask}")
        except (OSError, ValueError) as e:
            raise SystemExit(f"--masks[{i}] / --images[{i}]: {e}") from None
        shape = pixels.shape
        if shape != (height, width):
            raise SystemExit(f"--masks[{i}]: {mask} is {shape[1]}x{shape[0]} but its image {image} is {width}x{height}")
        if not pixels.any():
            raise SystemExit(f"--masks: {mask} selects nothing (no white or painted pixel), so its image {image} "
                             "would come back unchanged")
    return [list(t) for t in zip(images, masks, prompts)]


def _check_options(args: argparse.Namespace, total: int) -> None:
    """Every option that can be checked without the model, each error naming its option."""
    from medim.pipelines.common import check_text
    from medim.utils.checks import check_int

    with usage_errors():
        check_int(args.num_per_prompt, "--num-per-prompt", minimum=1)
        check_int(args.batch_size, "--batch-size", minimum=1)
        check_int(args.mask_dilation, "--mask-dilation", minimum=0)
    if args.prompt is not None:
        with usage_errors():
            check_text(args.prompt, "--prompt")
    if args.seed < 0 or args.seed + total - 1 > MAX_SEED:
        raise SystemExit(f"--seed: sample i uses seed + i, which must stay in [0, {MAX_SEED}]; with {total} samples "
                         f"--seed {args.seed} gives [{args.seed}, {args.seed + total - 1}]")


def _input_files(task: str, inputs: list) -> list[str]:
    """The files a run reads (images, masks): a resume compares their contents."""
    if task == "inpaint":
        return [path for image, mask, _ in inputs for path in (image, mask)]
    return list(inputs) if task == "report" else []


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



def _generate(args: argparse.Namespace, pipe, chunk: list[int], entries: list[dict], *, inputs: list,
              image_size: tuple[int, int] | None, sampling: dict) -> None:
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
    method = getattr(pipe, TASKS[args.task])
    generators = [torch.Generator(pipe.device).manual_seed(args.seed + chunk[n]) for n in keep]
    if args.task == "report":
        out = method(sources, prompt=args.prompt, generator=generators, **sampling)
    elif args.task == "inpaint":
        given = [inputs[chunk[n] // args.num_per_prompt] for n in keep]
        prompts = [p for _, _, p in given]
        out = method(sources, [m for _, m, _ in given], None if prompts[0] is None else prompts,
                     mask_dilation=args.mask_dilation, generator=generators, **sampling)
    else:
        size = {} if image_size is None else {"image_size": image_size}  # None: the pipeline's default
        out = method(sources, generator=generators, **size, **sampling)
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
        # Sizes as written: a resume remakes a file cut short or replaced since (manifest.whole).
        entry["bytes"] = {entry[key]: (args.out / entry[key]).stat().st_size for key in ("image", "report")
                          if key in entry}


def run(args: argparse.Namespace) -> int:
    from medim.utils.sharding import current_shard, shard

    # Check everything that can be checked before the (slow) model load; every rank does the same.
    model_hub_options(args, "medim generate")  # offline, a Hub model fails here in seconds, before torch loads
    image_size = _image_size(args.image_size)
    inputs = _inputs(args)
    total = len(inputs) * max(args.num_per_prompt, 1)
    _check_options(args, total)
    sampling = sampler_options(args)
    where = current_shard()
    spec = pipeline_spec(args, "medim generate", local_rank=where.local_rank, world_size=where.world_size)
    settings = dict(
        task=args.task, model=args.model, loader=args.loader, revision=args.revision, lora=args.lora,
        fuse_lora=args.fuse_lora, **{field: sampling.get(field) for field in SAMPLER_FIELDS}, prompt=args.prompt,
        image_size=None if image_size is None else list(image_size),  # None: the pipeline's default
        dtype=str(spec.dtype).removeprefix("torch."), seed=args.seed, num_per_prompt=args.num_per_prompt,
        mask_dilation=args.mask_dilation if args.task == "inpaint" else None,
    )
    with _stop_on_sigterm(), _process_group(where.world_size) as barrier:
        if where.rank == 0:
            prepare(args.out, settings, inputs, args.num_per_prompt, files=_input_files(args.task, inputs))
        barrier()
        done = set(read(args.out)[1])
        # Planned lazily: memory does not grow with the number of samples asked for.
        mine = shard((i for i in range(total) if i not in done), where.rank, where.world_size)
        count = len(range(where.rank, total - len(done), where.world_size))
        logger.info("%d samples, %d already done in %s; rank %d of %d makes %d", total, len(done), args.out,
                    where.rank, where.world_size, count)
        if count:
            _make(args, load_pipeline(spec), mine, count=count, inputs=inputs, image_size=image_size,
                  sampling=sampling, common=dict(loader=spec.loader, settings=settings), where=where)
        barrier()
        if where.rank == 0:
            header, entries, dirty = read(args.out)
            if dirty:
                merge(args.out, header, entries)
            skipped = sum("error" in entry for entry in entries.values())
            note = f"; {skipped} skipped (unreadable images, see 'error' in the manifest)" if skipped else ""
            print(f"{len(entries)} samples in {args.out} (manifest: {args.out / MANIFEST}){note}")
    return 0


def _make(args: argparse.Namespace, pipe, mine: Iterator[int], *, count: int, inputs: list,
          image_size: tuple[int, int] | None, sampling: dict, common: dict, where) -> None:
    """Make this rank's `count` samples (`mine`) in chunks of --batch-size; each one's manifest line
    (with `common`) goes to the rank's part after its files."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    part = part_path(args.out, where.rank, where.world_size)
    who = f"rank {where.rank} of {where.world_size}" if where.world_size > 1 else "medim generate"
    with tqdm(total=count, desc=f"medim generate {args.task}", unit="sample", disable=where.rank != 0) as bar:
        while chunk := list(itertools.islice(mine, args.batch_size)):
            entries = [dict(**MARK, index=i, seed=args.seed + i, **common) for i in chunk]
            try:
                _generate(args, pipe, chunk, entries, inputs=inputs, image_size=image_size, sampling=sampling)
            except Exception:
                logger.error("%s failed while making samples %s", who, chunk)
                raise
            for entry in entries:  # the manifest line is written last: without one, a sample is not finished
                with open(part, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            bar.update(len(chunk))

"""What several commands share: the Hub options (`--revision`, `--cache-dir`, `--local-files-only`,
`--token`); the pipeline to load (`--model`, `--loader`, `--device`, `--dtype`), checked before it
loads and loaded the one way every command does; the sampler options, named as the `SamplerConfig`
fields they set; a help formatter that states each default once; expanding `--images`-style glob
patterns; reading a UTF-8 file of one text a line; the rule for a result file (`--out`,
`--output`): written over only when it is a result medim wrote; and the end of a training run.

Nothing here imports torch at module level: every command's parser is built for `medim --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the parsers are built without torch
    import torch

    from medim.pipelines.pipeline import MeDiMPipeline
    from medim.utils.hub import HubOptions

# The released MeDiM weights on the Hub (read with MeDiMPipeline.from_original).
RELEASED_CHECKPOINT = "JiaMao/medim_ckpts"
# As medim.pipelines.loading.LOADERS (kept torch-free here).
LOADERS = ("auto", "pretrained", "original")
DTYPES = ("float32", "bfloat16", "float16")
# The SamplerConfig fields a command line sets (`add_sampler_arguments`), each by its own name.
SAMPLER_FIELDS = ("num_inference_steps", "guidance_scale", "strategy", "schedule", "temperature", "top_k", "top_p",
                  "cache_interval", "order", "text_share")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help states its default already or
    there is none to state (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn a check's ValueError (whose message names the option) into the command's exit message."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(str(e)) from None


def add_hub_arguments(parser: argparse.ArgumentParser, revision_of: str = "the model") -> None:
    """Add the Hub options; `revision_of` says which input `--revision` applies to."""
    parser.add_argument("--revision", default=None, help=f"Hub revision (branch, tag or commit) of {revision_of}")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the cache")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def hub_options(args: argparse.Namespace) -> HubOptions:
    """The parsed Hub options as a `medim.utils.hub.HubOptions`."""
    from medim.utils.hub import HubOptions

    return HubOptions(args.revision, args.cache_dir, args.local_files_only, args.token)


# ----------------------------------------------------------------------------------- the pipeline


def add_pipeline_arguments(parser: argparse.ArgumentParser, *, default_model: str = "medim-demo") -> None:
    """Add `--model` (default `default_model`), `--loader`, the Hub options, `--device` and `--dtype`,
    read by `pipeline_spec`."""
    example = "" if default_model == RELEASED_CHECKPOINT else f", e.g. {RELEASED_CHECKPOINT}"  # named once in --help
    parser.add_argument("--model", default=default_model,
                        help="a saved MeDiMPipeline (folder or Hub repo with model_index.json), the bundled "
                             "'medim-demo', or the released MeDiM checkpoint (folder or Hub repo with "
                             f"model.safetensors{example})")
    parser.add_argument("--loader", choices=LOADERS, default="auto",
                        help="how to read --model: 'pretrained' = MeDiMPipeline.from_pretrained, 'original' = "
                             "MeDiMPipeline.from_original (the released checkpoint), 'auto' = pretrained for a "
                             "bundled name or a model_index.json, original for a folder holding model.safetensors "
                             "(at the top or in checkpoint_<step>/) or a Hub repo without model_index.json")
    add_hub_arguments(parser, "--model")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--lora", default=None, metavar="PATH",
                        help="a LoRA adapter to load into the model: a folder or Hub repo written by `medim train` "
                             "with lora.r > 0 (its final/) or by MeDiMPipeline.save_lora_weights")
    parser.add_argument("--fuse-lora", action="store_true",
                        help="add the --lora adapter into the weights before sampling (no adapter cost per step)")


@dataclass(frozen=True)
class PipelineSpec:
    """The pipeline a command's options name, checked (`pipeline_spec`); `load_pipeline` loads it."""

    command: str  # "medim generate": the errors say who failed
    model: str
    loader: str  # "pretrained" or "original": detect_loader's answer for --loader
    hub: HubOptions
    device: torch.device
    dtype: torch.dtype
    lora: str | None = None  # --lora: an adapter folder or Hub repo
    fuse_lora: bool = False


def device_option(text: str | None, *, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """--device parsed and checked; under torchrun a bare "cuda" is the GPU of the process's LOCAL_RANK."""
    import torch

    from medim.utils.checks import check_dtype_device

    text = text or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        _, device = check_dtype_device(None, text)
    except ValueError as e:
        raise SystemExit(f"--device: {e}") from None
    if device.type == "cuda":  # available: check_dtype_device says so
        if device.index is None and world_size > 1:
            if local_rank >= torch.cuda.device_count():
                raise SystemExit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                                 "start at most one process per GPU")
            device = torch.device("cuda", local_rank)
        if device.index is not None:  # "cuda" alone is the current device already
            torch.cuda.set_device(device)
    return device


# Said after an error that means the Hub was needed and could not help (unreachable, or offline and not cached).
WITHOUT_HUB = ("Without the Hub, give --model medim-demo (the bundled model) or a folder; HF_HUB_OFFLINE=1 reads "
               "a cached repo without trying the Hub")


def _cannot_load(command: str, model: str, err: Exception) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError

    from medim.utils.hub import HubUnreachableError

    # detect_loader's folder errors begin with the folder's name; it is said once.
    message = f"{command}: cannot load --model {model}: {str(err).removeprefix(f'{model}: ')}"
    if isinstance(err, (HubUnreachableError, LocalEntryNotFoundError)):
        message = f"{message.rstrip('.')}. {WITHOUT_HUB}."
    return message


def model_hub_options(args: argparse.Namespace, command: str) -> HubOptions:
    """The Hub options to load --model with: as given, or local files only when the Hub cannot be
    reached but its cache holds the model. Offline, a Hub model that is not cached stops the command
    here in seconds (`medim.utils.hub.hub_fetch_options`); call it before torch loads."""
    from medim.utils.hub import hub_fetch_options, is_hub_repo_name

    hub = hub_options(args)
    try:
        return hub_fetch_options(args.model, hub) if is_hub_repo_name(args.model) else hub
    except OSError as e:
        raise SystemExit(_cannot_load(command, args.model, e)) from None


def pipeline_spec(args: argparse.Namespace, command: str, *, local_rank: int = 0, world_size: int = 1) -> PipelineSpec:
    """`add_pipeline_arguments`' options, checked before any weights load: --device first, then
    --model through `medim.pipelines.loading.detect_loader` (a missing folder, or a Hub that cannot
    be reached, stops here with the real error; `model_hub_options` first)."""
    hub = model_hub_options(args, command)

    import torch

    from medim.pipelines.loading import detect_loader

    device = device_option(args.device, local_rank=local_rank, world_size=world_size)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        loader = detect_loader(args.model, loader=args.loader, hub=hub)
    except (OSError, ValueError) as e:  # every Hub error is one of these
        raise SystemExit(_cannot_load(command, args.model, e)) from None
    if args.fuse_lora and args.lora is None:
        raise SystemExit(f"{command}: --fuse-lora needs --lora PATH")
    if args.lora is not None:
        lora = Path(args.lora).expanduser()
        if (lora.exists() or args.lora.startswith((".", "/", "~"))) and not lora.is_dir():
            raise SystemExit(f"{command}: --lora {args.lora}: no such folder (give the adapter's folder, e.g. a "
                             "training run's final/)")
    return PipelineSpec(command, args.model, loader, hub, device, dtype, lora=args.lora, fuse_lora=args.fuse_lora)


def load_pipeline(spec: PipelineSpec) -> MeDiMPipeline:
    """`MeDiMPipeline.from_pretrained` or `from_original` (as `spec.loader` says) on `spec.model`;
    a load error exits as `medim COMMAND: cannot load --model X: <the error>`."""
    from medim.pipelines.pipeline import MeDiMPipeline

    load = MeDiMPipeline.from_original if spec.loader == "original" else MeDiMPipeline.from_pretrained
    try:
        pipe = load(spec.model, dtype=spec.dtype, device=spec.device, **spec.hub.kwargs())
    except (OSError, ValueError) as e:
        raise SystemExit(_cannot_load(spec.command, spec.model, e)) from None
    if spec.lora is not None:
        try:  # --revision names a commit of --model only
            pipe.load_lora_weights(spec.lora, **spec.hub.without_revision().kwargs())
        except (OSError, ValueError, ImportError) as e:
            raise SystemExit(f"{spec.command}: cannot load --lora {spec.lora}: {e}") from None
        if spec.fuse_lora:
            pipe.fuse_lora()
    return pipe


# ----------------------------------------------------------------------------------- the sampler


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per `SAMPLER_FIELDS` entry, named as the field (`--steps` is short for
    `--num-inference-steps`); `sampler_options` reads them."""
    group = parser.add_argument_group("sampler", "settings of the model's saved SamplerConfig to override (every "
                                                 "one defaults to the model's; docs/sampling.md)")
    group.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, metavar="N",
                       help="denoising steps")
    group.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale, 0 = off")
    group.add_argument("--strategy", help="maskgit, threshold or ddpm")
    group.add_argument("--schedule", help="maskgit's commit schedule: arccos, cosine, linear or cosine_ratio "
                                          "(its first step commits more than one token; for few steps)")
    group.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    group.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1]")
    group.add_argument("--cache-interval", type=int,
                       help="context caching: refresh the cached keys/values every k steps (approximate; 1 = exact)")
    group.add_argument("--order", help="maskgit's commit order: confidence, halton (image codes in a spread-out "
                                       "spatial order) or text_first (a pair's report first, then its image)")
    group.add_argument("--text-share", type=float, metavar="F",
                       help="with --order text_first: the share of the steps that write the report, in (0, 1)")


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options given (as the `**sampler_options` of a pipeline task), each checked by
    `medim.diffusion.SamplerConfig` before any model loads; an error names its option."""
    from medim.diffusion import SamplerConfig

    options = {field: getattr(args, field) for field in SAMPLER_FIELDS if getattr(args, field) is not None}
    for field, value in options.items():
        try:
            SamplerConfig(**{field: value})
        except ValueError as e:
            raise SystemExit(f"--{field.replace('_', '-')}: {e}") from None
    if "order" in options and "strategy" in options:
        with usage_errors():
            SamplerConfig(order=options["order"], strategy=options["strategy"])
    return options


# ----------------------------------------------------------------------------------- inputs

def expand_globs(patterns: list[str], option: str) -> list[str]:
    """Files matching each pattern (sorted per pattern, in the order given); a pattern matching
    nothing is an error naming `option`."""
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise SystemExit(f"{option}: nothing matches {pattern!r}")
        paths.extend(matched)
    return paths


def read_lines(path: Path, option: str, what: str = "prompt") -> list[str]:
    """The non-blank lines of a UTF-8 text file (a BOM is allowed), stripped; errors name `option`,
    the file and, for bytes that are not UTF-8, the line."""
    if not path.is_file():
        raise SystemExit(f"{option}: {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SystemExit(f"{option}: {path} line {line} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "save the file as UTF-8") from None
    lines = [t for t in (line.strip() for line in text.splitlines()) if t]
    if not lines:
        raise SystemExit(f"{option}: {path} holds no {what}")
    return lines



# Every result file of `medim score` / `medim evaluate` is JSON carrying this key (on each line of
# JSON lines, first in an object; a CSV starts with medim's own header row): how a file named as an
# output is known to be one medim may replace.
RESULT_KEY = "medim"


def check_output_file(path: str | os.PathLike, option: str, csv_header: str | None = None) -> Path:
    """`path` as a file a command may write: refuses a folder, or a file that holds something medim
    did not write (a previous result of medim's is replaced); checked before any compute."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a folder; name the file to write")
    if path.exists() and not _medim_result(path, csv_header):
        raise ValueError(f"{option}: {path} exists and is not a result medim wrote; it is left as it is: "
                         "name a new file (or remove it)")
    return path


def _medim_result(path: Path, csv_header: str | None) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20).decode("utf-8").strip()
            if csv_header is not None:
                return first == csv_header
            if first == "{":  # indented JSON: its first key
                first = "{" + f.readline(1 << 20).decode("utf-8").strip().rstrip(",") + "}"
        row = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(row, dict) and RESULT_KEY in row


def finish_training_run(command: str, config: Any, out: Any, summary: str) -> int:
    """The end of `medim train` / `medim distill` (`out`: the TrainOutput): rank 0 says where the
    result is (`... finished at step N; <summary>`), once. A process that ran a process group
    (torchrun, or `train.parallel` ddp/fsdp on one process) then exits without the interpreter's
    teardown: gloo's worker threads outlive `destroy_process_group` (FSDP's DTensor caches keep the
    group alive) and free a finished collective's tensors a moment after it completes; one doing so
    while the interpreter tears down cannot take the GIL and aborts the process ("terminate called
    without an active exception", about 1 in 60 finished two-rank FSDP runs on CPU), so torchrun
    reported a finished run as failed. Everything the run writes is on disk by then (atomic writes,
    its log closed). Returns 0 otherwise."""
    from medim.utils.sharding import current_shard

    shard = current_shard()
    if out.final_dir is not None and shard.rank == 0:
        print(f"{command}: finished at step {out.step}; {summary}")
    if shard.world_size > 1 or config.train.parallel in ("ddp", "fsdp"):
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0

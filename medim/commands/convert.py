"""`medim convert {original,liquid,vqgan}`: turn upstream checkpoints into medim folders.

- `original`: the released MeDiM weights (+ Liquid's config, the Llama-2 tokenizer and the
  Chameleon VQGAN) -> a pipeline folder that `MeDiMPipeline.from_pretrained` loads.
- `liquid`: a fresh, trainable MeDiM cut from Liquid's first `--num-layers` layers -> a pipeline folder.
- `vqgan`: a taming `vqgan.ckpt` (+ `vqgan.yaml`) -> config.json + model.safetensors.

Outputs are safetensors and JSON only, written atomically; an existing non-empty `--out` is replaced
only with `--overwrite` and only when it is a previous output holding nothing else (a user's file
is never deleted), checked before anything is loaded.

Example:
    medim convert original --checkpoint JiaMao/medim_ckpts --dtype bfloat16 --out medim-v1
    medim convert liquid --backbone Junfeng5/Liquid_V1_7B --num-layers 10 --out medim-base
    medim convert vqgan --ckpt chameleon/vqgan.ckpt --out vqgan
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medim.commands.common import DTYPES, HelpFormatter, add_hub_arguments, hub_options

HELP = "convert upstream checkpoints (released MeDiM, Liquid, taming VQGAN) to medim folders"

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _image_offset(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative int or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int or 'none', got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.formatter_class = HelpFormatter
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous output in --out (a folder holding other files is refused)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weight dtype of the written files (the VQGAN codebook always stays float32)")
    p.add_argument("--device", default="cpu", help="torch device to convert on (the output is the same)")
    add_hub_arguments(p, "the main input (--checkpoint, --backbone or --ckpt)")


def _pipeline_parts(p: argparse.ArgumentParser, tokenizer_default: str | None, tokenizer_help: str) -> None:
    p.add_argument("--tokenizer", default=tokenizer_default, help=tokenizer_help)
    p.add_argument("--vqgan", default="Junfeng5/Liquid_demo",
                   help="Chameleon VQGAN: taming checkpoint (Hub repo, folder or vqgan.ckpt file) or a saved "
                        "medim VQGAN folder")
    p.add_argument("--vqgan-subfolder", default="chameleon",
                   help="folder inside --vqgan holding vqgan.ckpt + vqgan.yaml (ignored when a local --vqgan lacks it)")
    p.add_argument("--vqgan-repo-type", choices=("model", "space", "dataset"), default="space",
                   help="Hub repo type of --vqgan (the Liquid demo is a Space)")
    p.add_argument("--num-layers", type=_positive_int, default=10, help="backbone layers kept (MeDiM: 10)")
    p.add_argument("--text-len", type=_positive_int, default=256, help="report token slots of the layout")
    p.add_argument("--image-len", type=_positive_int, default=1024, help="image token slots (a square: 32x32 = 1024)")
    p.add_argument("--max-shard-size", default="5GB", help="largest model safetensors shard, e.g. 2GB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    p = sub.add_parser("original", help="the released MeDiM checkpoint -> a pipeline folder (medim-v1 layout)",
                       description="The released MeDiM weights (accelerate save_state output) assembled with "
                       "their config, tokenizer and VQGAN into a MeDiMPipeline folder.")
    p.add_argument("--checkpoint", default="JiaMao/medim_ckpts",
                   help="Hub repo or folder with model.safetensors at the top or under checkpoint_<step>/ "
                        "(the newest is used)")
    p.add_argument("--backbone", default="Junfeng5/Liquid_V1_7B",
                   help="where the Gemma config comes from (only config.json is read); 'none' uses Liquid's "
                        "built-in config")
    _pipeline_parts(p, "NousResearch/Llama-2-7b-hf",
                    "Llama-2 tokenizer files (Hub repo or folder); <boi> <eoi> <eos> are added after its vocabulary")
    p.add_argument("--base-vocab-size", type=_positive_int, default=32000,
                   help="text vocabulary of the tokenizer before <boi> <eoi> <eos> (Llama-2: 32000)")
    p.add_argument("--image-vocab-size", type=_positive_int, default=8192, help="VQGAN codebook size")
    _common(p)

    p = sub.add_parser("liquid", help="Liquid's first layers -> a fresh, trainable pipeline folder (native layout)",
                       description="A fresh MeDiM for training: the first --num-layers layers of a Liquid-format "
                       "checkpoint, a mask row, a new timestep embedder and identity AdaLN, with the VQGAN and "
                       "tokenizer.")
    p.add_argument("--backbone", default="Junfeng5/Liquid_V1_7B",
                   help="Hub repo or folder of a Gemma/Llama-style causal LM in the transformers format")
    _pipeline_parts(p, None, "tokenizer files (Hub repo or folder); default: the backbone's own")
    p.add_argument("--image-offset", type=_image_offset, default=256000,
                   help="backbone row of image code 0 (Liquid: 256000); 'none' appends image rows to a plain LLM")
    _common(p)

    p = sub.add_parser("vqgan", help="a taming VQGAN checkpoint -> config.json + model.safetensors",
                       description="Read a taming-transformers vqgan.ckpt (pickle, read with weights_only) and "
                       "write it as a medim VQGAN folder (VQGAN.from_pretrained loads it).")
    p.add_argument("--ckpt", required=True,
                   help="vqgan.ckpt file, a folder holding it, or a Hub repo id (release: Junfeng5/Liquid_demo "
                   "with --repo-type space --subfolder chameleon)")
    p.add_argument("--config", default=None,
                   help="taming vqgan.yaml; default: the one beside the checkpoint (else Chameleon's config, "
                        "with a warning)")
    p.add_argument("--subfolder", default=None, help="folder inside --ckpt holding vqgan.ckpt")
    p.add_argument("--repo-type", choices=("model", "space", "dataset"), default=None, help="Hub repo type of --ckpt")
    _common(p)


# What each conversion writes at the top of --out: --overwrite replaces only such a folder.
WRITES = {"vqgan": ("config.json", {"config.json", "model.safetensors", "README.md"}),
          "pipeline": ("model_index.json", {"model_index.json", "README.md", "model", "vqgan", "tokenizer"})}


def _check_out(out: Path, overwrite: bool, kind: str) -> None:
    """Refuse before any loading, not after minutes of it (save_pretrained checks again, file by
    file): a non-empty --out without --overwrite, or with it one that is not a previous output
    (its `marker` missing, or other names beside it)."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"--out: {out} is not empty; pass --overwrite to replace it")
    marker, names = WRITES[kind]
    if out.is_dir() and any(out.iterdir()):
        other = sorted(p.name for p in out.iterdir() if p.name not in names)
        if other or not (out / marker).is_file():
            found = ", ".join(other) or f"no {marker}"
            raise SystemExit(f"--out: {out} is not a previous output of medim convert ({found}); --overwrite replaces "
                             "only such a folder: move the files out or choose another --out")


def run(args: argparse.Namespace) -> int:
    import torch

    _check_out(args.out, args.overwrite, "vqgan" if args.source == "vqgan" else "pipeline")
    dtype = getattr(torch, args.dtype)
    hub = hub_options(args).kwargs()
    if args.source == "vqgan":
        from medim.models.vqgan import VQGAN

        vqgan = VQGAN.from_taming(args.ckpt, args.config, subfolder=args.subfolder, repo_type=args.repo_type,
                                  dtype=dtype, device=args.device, **hub)
        out = vqgan.save_pretrained(args.out, overwrite=args.overwrite)
        print(f"VQGAN ({vqgan.num_parameters():,} parameters, {vqgan.num_codes} codes) written to {out}")
        return 0

    from medim.pipelines.pipeline import MeDiMPipeline

    parts = dict(vqgan=args.vqgan, vqgan_subfolder=args.vqgan_subfolder, vqgan_repo_type=args.vqgan_repo_type,
                 num_layers=args.num_layers, dtype=dtype, device=args.device, **hub)
    if args.source == "original":
        layout = dict(name="medim-v1", base_vocab_size=args.base_vocab_size, text_len=args.text_len,
                      image_len=args.image_len, image_vocab_size=args.image_vocab_size)
        backbone = None if args.backbone.lower() == "none" else args.backbone
        pipe = MeDiMPipeline.from_original(args.checkpoint, backbone=backbone, tokenizer=args.tokenizer,
                                           layout=layout, **parts)
    else:
        pipe = MeDiMPipeline.from_base_models(args.backbone, tokenizer=args.tokenizer, text_len=args.text_len,
                                              image_len=args.image_len, image_offset=args.image_offset, **parts)
    out = pipe.save_pretrained(args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    count = sum(p.numel() for p in pipe.model.parameters())
    print(f"MeDiMPipeline ({pipe.layout.name} layout, {len(pipe.model.layers)} layers, {count:,} parameters, "
          f"{args.dtype}) written to {out}")
    return 0

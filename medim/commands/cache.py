"""`medim cache`: encode a paired dataset once into a token cache for training.

Images go through the VQGAN once (batched, on the GPU when there is one) and reports through the
tokenizer for the layout; the result is safetensors shards + index.json, resumable after an
interruption (finished shards are kept) by the same command: index.json records the dataset
(--dataset, --dataset-args but a Hub token, --data-root; for the hf kind also the dataset's own
fingerprint), the VQGAN and tokenizer hashes and the settings, and a re-run with other inputs is
refused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medim.commands.common import HelpFormatter, add_hub_arguments, hub_options

HELP = "encode images and reports once into a token cache (resumable)"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument(
        "--dataset", required=True,
        help="dataset kind: folder, jsonl, pathgen, mimic-cxr, phantom or hf (a Hugging Face dataset)",
    )
    parser.add_argument(
        "--data-root", default=None,
        help="the dataset's main path: folder root, jsonl manifest, pathgen records file, "
        "mimic-cxr jpg root, hf path (a save_to_disk folder, data folder or Hub id) "
        "(other arguments go in --dataset-args)",
    )
    parser.add_argument(
        "--dataset-args", default="{}",
        help='JSON object of further build_dataset arguments, e.g. \'{"split": "train"}\'',
    )
    parser.add_argument(
        "--model", default=None,
        help="a saved MeDiMPipeline (directory, Hub repo, or the bundled 'medim-demo'): its vqgan/, tokenizer/ "
        "and layout are used",
    )
    add_hub_arguments(parser, "--model")
    parser.add_argument("--vqgan", default=None, help="VQGAN directory or repo (instead of --model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or repo (instead of --model)")
    parser.add_argument(
        "--layout", default=None, help="layout JSON file (SequenceLayout.to_dict()) (instead of --model)"
    )
    parser.add_argument("--out", required=True, type=Path, help="cache directory (resumed if it exists)")
    parser.add_argument("--shard-size", type=int, default=1024, help="items per shard")
    parser.add_argument("--batch-size", type=int, default=16, help="images per VQGAN forward")
    parser.add_argument("--resize", choices=("pad", "crop"), default="pad", help="how images become square")
    parser.add_argument("--device", default=None, help="VQGAN device (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing cache from scratch")


# The main path argument of each dataset kind.
_ROOT_ARG = {"folder": "root", "jsonl": "manifest", "pathgen": "records", "mimic-cxr": "jpg_root", "hf": "path"}


def run(args: argparse.Namespace) -> int:
    from medim.data.cache import build_token_cache
    from medim.data.datasets import build_dataset

    parts = [p is not None for p in (args.vqgan, args.tokenizer, args.layout)]
    if (args.model is None and not all(parts)) or (args.model is not None and any(parts)):
        raise SystemExit("medim cache: pass either --model, or all of --vqgan, --tokenizer and --layout")
    try:
        dataset_kwargs = json.loads(args.dataset_args)
    except json.JSONDecodeError as e:
        raise SystemExit(f"medim cache: --dataset-args is not valid JSON: {e}") from e
    if not isinstance(dataset_kwargs, dict):
        raise SystemExit(f"medim cache: --dataset-args must be a JSON object, got {args.dataset_args!r}")
    if args.data_root is not None:
        if args.dataset not in _ROOT_ARG:
            raise SystemExit(f"medim cache: --data-root does not apply to --dataset {args.dataset}")
        # Absolute, so that the cache records which data it holds whatever the working directory
        # (an hf path that is no local file or folder is a Hub id, kept as written).
        root = Path(args.data_root).expanduser()
        local = args.dataset != "hf" or root.exists()
        dataset_kwargs[_ROOT_ARG[args.dataset]] = str(root.resolve()) if local else args.data_root
    try:
        dataset = build_dataset(args.dataset, **dataset_kwargs)
        vqgan, tokenizer, layout, tokenizer_name = _parts(args)
        summary = build_token_cache(
            dataset, args.out, vqgan=vqgan, tokenizer=tokenizer, layout=layout,
            # A Hub token is a secret, and not what decides the data: not written to index.json.
            source={"kind": args.dataset, "args": {k: v for k, v in dataset_kwargs.items() if k != "token"}},
            tokenizer_name=tokenizer_name,
            shard_size=args.shard_size, batch_size=args.batch_size, resize=args.resize, overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, TypeError, ImportError,
            ConnectionError) as e:
        raise SystemExit(f"medim cache: {e}") from e
    print(f"{summary.path}: {summary.num_items} items cached, skipped {summary.skipped or 'none'} "
          f"({summary.shards_written} shards written, {summary.shards_reused} reused)")
    return 0


def _parts(args: argparse.Namespace):
    """The VQGAN, tokenizer, layout and a name for the tokenizer, from --model or the three options."""
    import torch

    from medim.layout import SequenceLayout
    from medim.models.vqgan import VQGAN
    from medim.pipelines import loading

    hub = hub_options(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is not None:
        try:
            root, index = loading.saved_pipeline_index(args.model, hub, (loading.MODEL_INDEX, "vqgan/*", "tokenizer/*"))
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise SystemExit(f"medim cache: --model {e}") from e
        if not isinstance(index.get("layout"), dict):
            raise SystemExit(f"medim cache: --model {root / loading.MODEL_INDEX} holds no layout object")
        layout = SequenceLayout.from_dict(index["layout"])
        return (VQGAN.from_pretrained(root / "vqgan", device=device), loading.load_tokenizer(root / "tokenizer", hub),
                layout, str(args.model))
    layout_path = Path(args.layout)
    if not layout_path.is_file():
        raise SystemExit(f"medim cache: --layout {layout_path}: no such file")
    layout = SequenceLayout.from_dict(loading.json_object(layout_path))
    others = hub.without_revision()  # --revision names a commit of --model only
    vqgan = VQGAN.from_pretrained(args.vqgan, device=device, **others.kwargs())
    return vqgan, loading.load_tokenizer(args.tokenizer, others), layout, str(args.tokenizer)

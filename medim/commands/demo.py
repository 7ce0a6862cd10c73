"""`medim demo`: the shipped phantom model, offline, on a CPU; or its evaluation, or a retraining."""

from __future__ import annotations

import argparse
import json

from medim.demo.settings import DEMO_NAME, BuildSettings  # torch-free: the parser reads the defaults

HELP = "run the tiny phantom MeDiM that ships with medim (no download, no GPU needed)"

# The `--retrain` sizes that have an option: BuildSettings field -> what it sets.
RETRAIN_SIZES = {
    "num_train": "training phantom pairs",
    "vqgan_steps": "VQGAN optimizer steps",
    "model_steps": "MeDiM optimizer steps",
    "batch_size": "MeDiM batch size",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"With no options: writes text-to-image, image-to-report and pair results of the shipped model "
        f"to ./{DEMO_NAME}/. --evaluate scores it on held-out phantoms; --retrain DIR trains a new one."
    )
    parser.add_argument("--out", default=DEMO_NAME, help=f"folder for the demo outputs (default: ./{DEMO_NAME})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files already in --out (or the folder given to --retrain)")
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, metavar="N",
                        help="sampling steps per generation (default: the model's saved sampler settings)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: output i uses seed * 1000003 + i; with --retrain, the training seed "
                             "(default: 0)")
    parser.add_argument("--model", default=DEMO_NAME,
                        help=f"pipeline to run or evaluate (default: the shipped {DEMO_NAME!r}; a folder "
                             "written by --retrain works too)")
    parser.add_argument("--evaluate", action="store_true",
                        help="instead of writing examples, print the accuracies of the three tasks on "
                             "held-out phantoms, measured by the phantom readers")
    parser.add_argument("--n", type=int, default=200, help="held-out phantoms for --evaluate (default: 200)")
    parser.add_argument("--retrain", metavar="DIR",
                        help="instead, retrain the demo pipeline from scratch and save it to DIR "
                             "(about 1 h 45 min on two CPU cores at the default sizes)")
    parser.add_argument("--device", default=None, help="--retrain: device to train on (default: cuda if "
                                                       "available, else cpu)")
    defaults = BuildSettings()
    for name, what in RETRAIN_SIZES.items():  # None = the BuildSettings default, stated in the help
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"--retrain: {what} (default: {getattr(defaults, name)})")
    parser.add_argument("--vqgan", metavar="DIR",
                        help="--retrain: reuse this VQGAN folder (e.g. DIR/vqgan of an earlier build) "
                             "instead of training one, so only the MeDiM part is retrained")


def run(args: argparse.Namespace) -> int:
    from medim import demo
    from medim.pipelines.pipeline import MeDiMPipeline

    for name in ("num_inference_steps", "n", *RETRAIN_SIZES):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"medim demo: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.retrain:
        chosen = {name: getattr(args, name) for name in RETRAIN_SIZES if getattr(args, name) is not None}
        settings = BuildSettings(seed=args.seed, **chosen)
        path = demo.build_demo(args.retrain, settings, device=args.device, overwrite=args.overwrite,
                               vqgan=args.vqgan)
        print(f"demo pipeline saved to {path}; load it with MeDiMPipeline.from_pretrained({str(path)!r})")
        return 0
    try:
        if args.evaluate:
            pipe = MeDiMPipeline.from_pretrained(args.model)
            scores = demo.evaluate_demo(pipe, n=args.n, num_inference_steps=args.num_inference_steps, seed=args.seed)
            print(demo.scores_table(scores))
            return 0
        summary = demo.run_demo(args.out, num_inference_steps=args.num_inference_steps, seed=args.seed,
                                overwrite=args.overwrite, model=args.model)
    except (FileNotFoundError, FileExistsError) as e:  # no model / a non-empty --out
        raise SystemExit(f"medim demo: {e}") from None
    print(json.dumps(summary, indent=1))
    return 0

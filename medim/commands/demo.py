"""`medim demo`: the shipped phantom model, offline, in seconds."""

from __future__ import annotations

import argparse
import json

HELP = "Run the tiny phantom MeDiM that ships with medim (no download, no GPU needed)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "With no options: writes text-to-image, image-to-report and pair results of the shipped model "
        "to ./medim-demo/. --evaluate scores it on held-out phantoms; --retrain DIR trains a new one."
    )
    parser.add_argument("--out", default="medim-demo", help="folder for the demo outputs (default: ./medim-demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    parser.add_argument("--steps", type=int, default=16, help="sampling steps per generation (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; output i uses seed * 1000003 + i")
    parser.add_argument("--model", default="medim-demo",
                        help="pipeline to run or evaluate (default: the shipped 'medim-demo'; a folder "
                             "written by --retrain works too)")
    parser.add_argument("--evaluate", action="store_true",
                        help="instead of writing examples, print the accuracies of the three tasks on "
                             "held-out phantoms, measured by the phantom readers")
    parser.add_argument("--n", type=int, default=200, help="held-out phantoms for --evaluate (default: 200)")
    parser.add_argument("--retrain", metavar="DIR",
                        help="instead, retrain the demo pipeline from scratch and save it to DIR "
                             "(about 3 minutes on one GPU; slow on CPU unless the step counts are reduced)")
    parser.add_argument("--device", default=None, help="device for --retrain (default: cuda if available, else cpu)")
    parser.add_argument("--num-train", type=int, default=20_000, help="--retrain: training phantoms")
    parser.add_argument("--vqgan-steps", type=int, default=3000, help="--retrain: VQGAN optimizer steps")
    parser.add_argument("--model-steps", type=int, default=8000, help="--retrain: MeDiM optimizer steps")


def run(args: argparse.Namespace) -> int:
    from medim import demo
    from medim.pipeline import MeDiMPipeline

    for name in ("steps", "n", "num_train", "vqgan_steps", "model_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"medim demo: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.retrain:
        settings = demo.BuildSettings(seed=args.seed, num_train=args.num_train, vqgan_steps=args.vqgan_steps,
                                      model_steps=args.model_steps)
        path = demo.build_demo(args.retrain, settings, device=args.device, overwrite=args.overwrite)
        print(f"demo pipeline saved to {path}; load it with MeDiMPipeline.from_pretrained({str(path)!r})")
        return 0
    try:
        if args.evaluate:
            pipe = MeDiMPipeline.from_pretrained(args.model)
            print(demo.scores_table(demo.evaluate_demo(pipe, n=args.n, num_inference_steps=args.steps,
                                                       seed=args.seed)))
            return 0
        summary = demo.run_demo(args.out, num_inference_steps=args.steps, seed=args.seed, overwrite=args.overwrite,
                                model=args.model)
    except (FileNotFoundError, FileExistsError) as e:  # no model / a non-empty --out
        raise SystemExit(f"medim demo: {e}") from None
    print(json.dumps(summary, indent=1))
    return 0

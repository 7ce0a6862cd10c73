"""Generate synthetic image-report pairs with MeDiM (both modalities sampled jointly).

    python examples/generate_pairs.py --num 4                                                   # released weights
    python examples/generate_pairs.py --model path/to/saved_pipeline --num 8                    # any saved pipeline
    python examples/generate_pairs.py --model medim-demo --prompt "Frontal chest radiograph."   # the bundled demo

For large, resumable runs use the command line instead: `medim generate pairs --help`.
"""

import argparse
from pathlib import Path

import torch

from medim import MeDiMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="saved pipeline dir or repo (default: the released checkpoint)")
    parser.add_argument(
        "--prompt",
        default="The image is a radiograph of the chest, showing the thoracic cavity structures.",
        help="the beginning every report is given",
    )
    parser.add_argument("--num", type=int, default=4, help="pairs to generate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                        help="sampling steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("pairs"))
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model is None:
        pipe = MeDiMPipeline.from_original(dtype=dtype, device=device)
    else:
        pipe = MeDiMPipeline.from_pretrained(args.model, dtype=dtype, device=device)

    out = pipe.generate_pairs(
        [args.prompt], num_pairs_per_prompt=args.num, batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps, generator=torch.Generator(pipe.device).manual_seed(args.seed),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (image, report) in enumerate(zip(out.images, out.reports)):
        image.save(args.out / f"{i:04d}.png")
        (args.out / f"{i:04d}.txt").write_text(report + "\n")
        print(f"{i:04d}: {report}")


if __name__ == "__main__":
    main()

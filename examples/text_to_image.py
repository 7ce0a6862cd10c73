"""Generate chest X-rays from reports with MeDiM.

    python examples/text_to_image.py                                              # released weights from the Hub
    python examples/text_to_image.py --model path/to/saved_pipeline               # any saved MeDiMPipeline
    python examples/text_to_image.py --model medim-demo --num-inference-steps 8   # the bundled demo, no download
"""

import argparse

import torch

from medim import MeDiMPipeline

REPORTS = [
    "The image is a radiograph of the chest, showing the thoracic cavity structures. "
    "No acute cardiopulmonary process. Heart size is normal.",
    "The image is a radiograph of the chest, showing the thoracic cavity structures. "
    "Small left pleural effusion with adjacent atelectasis.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="saved pipeline dir or repo (default: the released checkpoint)")
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                        help="sampling steps (default: the model's, 128 for the release)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="text_to_image_{}.png", help="file name pattern, {} = sample index")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model is None:
        pipe = MeDiMPipeline.from_original(dtype=dtype, device=device)
    else:
        pipe = MeDiMPipeline.from_pretrained(args.model, dtype=dtype, device=device)

    generators = [torch.Generator(pipe.device).manual_seed(args.seed + i) for i in range(len(REPORTS))]
    out = pipe.text_to_image(REPORTS, num_inference_steps=args.num_inference_steps, generator=generators)
    for i, image in enumerate(out.images):
        image.save(args.out.format(i))
        print(f"{args.out.format(i)}: {REPORTS[i]}")


if __name__ == "__main__":
    main()

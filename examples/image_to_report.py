"""Write radiology reports for your own images with MeDiM.

    python examples/image_to_report.py cxr1.jpg cxr2.png                         # released weights
    python examples/image_to_report.py cxr.jpg --model path/to/saved_pipeline    # any saved pipeline
    python examples/image_to_report.py cxr.png --model medim-demo --prompt ''    # the bundled demo

Grayscale and 16-bit X-rays are fine: images are converted, padded to square and resized.
"""

import argparse

import torch

from medim import MeDiMPipeline

# The released model was trained on MIMIC-CXR reports that all start with this sentence.
MIMIC_PREFIX = "The image is a radiograph of the chest, showing the thoracic cavity structures."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", default=None, help="saved pipeline dir or repo (default: the released checkpoint)")
    parser.add_argument("--prompt", default=MIMIC_PREFIX, help="the beginning every report is given ('' for none)")
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                        help="sampling steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model is None:
        pipe = MeDiMPipeline.from_original(dtype=dtype, device=device)
    else:
        pipe = MeDiMPipeline.from_pretrained(args.model, dtype=dtype, device=device)

    out = pipe.image_to_report(
        args.images, prompt=args.prompt or None, num_inference_steps=args.num_inference_steps,
        generator=torch.Generator(pipe.device).manual_seed(args.seed),
    )
    for path, report in zip(args.images, out.reports):
        print(f"== {path}\n{report}\n")


if __name__ == "__main__":
    main()

"""Parameter count of the Chameleon VQGAN, and encode/decode speed at 512 px on one device.

    python benchmarks/vqgan_params.py                       # parameter count only (meta device)
    python benchmarks/vqgan_params.py --device cuda --batch 8

Random weights: the timings and the bf16-vs-fp32 code agreement are indicative only (trained
weights give larger distance margins, so agreement there is higher).
"""

from __future__ import annotations

import argparse
import time

import torch

from medim.models.vqgan import VQGAN, VQGANConfig


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="run encode/decode on this device (e.g. cuda)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for the convs")
    args = parser.parse_args()

    config = VQGANConfig()
    with torch.device("meta"):
        model = VQGAN(config)
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    print(f"Chameleon VQGAN: {model.num_parameters():,} parameters ({model.num_parameters() / 1e6:.1f} M)")
    for name, count in parts.items():
        print(f"  {name:16s} {count:>12,}")
    if args.device is None:
        return

    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = VQGAN(config).eval().to(device)
    pixels = torch.rand(args.batch, 3, 512, 512, device=device) * 2 - 1
    codes32 = reference.encode(pixels)
    for dtype in (torch.float32, torch.bfloat16):
        model = VQGAN(config).eval()
        model.load_state_dict(reference.state_dict())
        model = model.to(device, dtype)
        model.quantize.float()  # what the loaders do: nearest-code search against a float32 codebook
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        enc = timed(lambda m=model: m.encode(pixels), device)
        dec = timed(lambda m=model: m.decode(codes32), device)
        same = (model.encode(pixels) == codes32).float().mean().item()
        print(f"{str(dtype):15s} batch {args.batch}: encode {enc * 1e3:8.1f} ms ({args.batch / enc:6.1f} img/s), "
              f"decode {dec * 1e3:8.1f} ms ({args.batch / dec:6.1f} img/s), codes equal to fp32: {same:.4f}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

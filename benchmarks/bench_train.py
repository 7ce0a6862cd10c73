"""Training throughput: tokens/s and peak memory of one optimizer step per configuration.

    python benchmarks/bench_train.py                                    # CPU, tiny width
    python benchmarks/bench_train.py --size liquid --device cuda --batch 4   # the 3.5 B shape

A step is what `medim.training.Trainer` does per micro-batch: the masked-diffusion loss on a
random batch in the medim-v1 shape (256 + 1024 tokens), backward, gradient clipping, AdamW.
Configurations: float32; bf16 autocast; bf16 autocast + gradient checkpointing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    SIZES,
    machine_info,
    medim_v1_model,
    peak_memory,
    report,
    reset_peak_memory,
    text_to_image_batch,
    timed,
)

from medim.diffusion.loss import diffusion_loss  # noqa: E402

CONFIGS = {"fp32": (False, False), "bf16": (True, False), "bf16+ckpt": (True, True)}


def train_rate(model, batch: int, steps: int, bf16: bool, checkpointing: bool) -> dict[str, Any]:
    """Mean time of `steps` optimizer steps after one warm-up step; tokens/s and peak memory."""
    device = model.device
    layout = model.layout
    x0, _, cond = text_to_image_batch(layout, batch, device)
    x0[:, layout.text_len :] = torch.randint(0, layout.image_vocab_size, (batch, layout.image_len),
                                             device=device) + layout.image_segment.vocab_start
    model.train()
    model.set_activation_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(0)

    def denoiser(x, sigma, positions, **kwargs):
        return model(x, sigma, positions=positions, **kwargs).logprobs

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(denoiser, x0, layout.segments, layout.mask_id, loss_mask=x0 != layout.pad_id,
                                  generator=gen, model_kwargs=cond).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    base = reset_peak_memory(device)
    step()  # warm-up: optimizer state is allocated here, so it is inside the peak
    seconds, loss = timed(step, device, repeats=steps)
    peak = peak_memory(device)
    model.eval()
    return dict(batch=batch, tokens_per_s=batch * layout.state_len / seconds, s_per_step=seconds,
                peak_GiB=peak / 2**30, peak_minus_start_GiB=(peak - base) / 2**30, loss=float(loss))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    names = args.configs.split(",")
    if any(n not in CONFIGS for n in names) or args.batch < 1 or args.steps < 1:
        raise SystemExit(f"--configs must be a comma list of {list(CONFIGS)}; --batch and --steps >= 1")
    rows = []
    for name in names:
        model = medim_v1_model(args.size, device=args.device)  # fresh weights and optimizer each time
        rows.append({"config": name, **train_rate(model, args.batch, args.steps, *CONFIGS[name])})
        del model
    report(f"Training step ({args.size}, {args.device})", dict(size=args.size, batch=args.batch, steps=args.steps,
           optimizer="AdamW", layout="medim-v1 256+1024"), rows, machine_info(args.device),
           ["CPU peak = resident-set high-water mark of the process during the configuration"],
           results=None if args.no_record else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

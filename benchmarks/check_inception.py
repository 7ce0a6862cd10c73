"""medim's Inception-v3 classifier (the Inception Score network) against torchvision's, on the same
random weights: logits and softmax differences, and the IS each gives.

    pip install torchvision && python benchmarks/check_inception.py                 # CUDA if present
    python benchmarks/check_inception.py --device cpu --stub-meta-registrations     # see below

torchvision's wheels on PyPI are built against CUDA torch; with a CPU torch their compiled ops do
not load and `import torchvision` fails in `torchvision._meta_registrations`. Inception needs none
of those ops, so `--stub-meta-registrations` replaces that module with an empty one before the
import. Writes $OUT/check_inception.json (default ./device_out) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

from medim.evaluation import InceptionV3, inception_score_from_probs
from medim.utils.hub import atomic_file


def _randomize_(net: torch.nn.Module, seed: int) -> None:
    """He-scaled convolutions, near-identity batch norms, a classifier with logits of std ~ 5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "bn.weight")):
                t.copy_(0.8 + 0.4 * torch.rand(t.shape, generator=gen))
            elif name.endswith(("running_mean", "bn.bias", "fc.bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            else:
                gain = 2.0 if name.endswith("conv.weight") else 30.0
                t.copy_(torch.randn(t.shape, generator=gen) * (gain / t[0].numel()) ** 0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32, help="random inputs in [-1, 1] (default: 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stub-meta-registrations", action="store_true",
                        help="import torchvision without its compiled-op registrations (CPU torch)")
    args = parser.parse_args()
    if args.stub_meta_registrations:
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision
    from torchvision.models import inception_v3

    reference = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False).eval()
    _randomize_(reference, args.seed)
    with tempfile.TemporaryDirectory() as tmp:  # through a file, as the real weights come
        path = Path(tmp) / "inception_v3_random.pth"
        torch.save(reference.state_dict(), path)
        ours = InceptionV3.from_weights(path)
    device = torch.device(args.device)
    reference, ours = reference.to(device), ours.to(device)
    x = torch.rand(args.batch, 3, 299, 299, generator=torch.Generator().manual_seed(args.seed + 1)) * 2 - 1
    with torch.no_grad():
        a, b = reference(x.to(device)).float().cpu(), ours(x.to(device)).float().cpu()
    pa, pb = a.softmax(-1), b.softmax(-1)
    splits = max(1, args.batch // 8)
    result = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "batch": args.batch,
        "logit_std": a.std().item(),
        "logits_max_abs_diff": (a - b).abs().max().item(),
        "softmax_max_abs_diff": (pa - pb).abs().max().item(),
        "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "is_torchvision": inception_score_from_probs(pa, splits).mean,
        "is_medim": inception_score_from_probs(pb, splits).mean,
    }
    out = Path(os.environ.get("OUT", "device_out"))
    with atomic_file(out / "check_inception.json") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

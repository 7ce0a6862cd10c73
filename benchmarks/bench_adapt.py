"""LoRA-adapt the bundled demo to a phantom variant it has never seen, on CPU; score before and after.

    python benchmarks/bench_adapt.py                 # variant "structured"; appends to RESULTS.md
    python benchmarks/bench_adapt.py --variant effusion
    python benchmarks/bench_adapt.py --no-record --steps 100 --n-eval 50     # a pilot

Steps, all medim's own code paths: two token caches built with the demo (`medim cache`: variant
phantoms, and original phantoms replayed against forgetting), a LoRA run of `medim.training` from
configs/lora.yaml with CPU overrides on their mix, then `evaluate_demo` of the shipped demo and of
the demo with the adapter, on held-out variant phantoms and on the original ones, and the VQGAN
round trip of the variant phantoms (what any adapter's text -> image is capped at: the demo's
VQGAN stays frozen, and it cannot draw an effusion). `--work`
keeps the caches, the run and the scores (scores.json): a re-run reuses what is there, so the
same command resumes. The adapter is written under `--work`, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info  # noqa: E402

from medim.cli import main as medim_main  # noqa: E402
from medim.data import synthetic  # noqa: E402
from medim.data.cache import TokenCacheDataset  # noqa: E402
from medim.data.images import postprocess, preprocess  # noqa: E402
from medim.demo import evaluate_demo, scores_table  # noqa: E402
from medim.demo.settings import DEMO_NAME, EVAL_SEED, IMAGE_SIZE, demo_path  # noqa: E402
from medim.pipelines.pipeline import MeDiMPipeline  # noqa: E402
from medim.training import Trainer, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("image_to_report", "text_to_image", "pairs")
# The pieces of text each variant's reports add that the demo never wrote (its tokenizer spells them
# with tokens no training report held): their rows train (`lora.trainable_tokens`).
NEW_TEXT = {"structured": ["Findings:", "RUL", "RLL", "LUL", "LLL", ";", "none"],
            "multiple": ["Multiple", "s", "i", ",", ":"], "effusion": ["pleural effusion"]}


class Mix:
    """Several token caches of one layout read as one dataset (what the Trainer takes as `dataset=`)."""

    def __init__(self, *parts: TokenCacheDataset):
        self.parts, self.layout = parts, parts[0].layout
        self.index = {"parts": [p.index for p in parts]}  # the identity a resume checks
        self.owner = [(k, i) for k, p in enumerate(parts) for i in range(len(p))]

    def __len__(self) -> int:
        return len(self.owner)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.parts[k].batch([i]) for k, i in (self.owner[j] for j in indices)]
        return {key: torch.cat([r[key] for r in rows]) for key in rows[0]}


def build_cache(out: Path, n: int, seed: int, variant: str | None) -> TokenCacheDataset:
    """`medim cache --dataset phantom` with the demo (resumed if `out` is already there)."""
    args = {"n": n, "seed": seed} | ({"variant": variant} if variant else {})
    medim_main(["cache", "--dataset", "phantom", "--dataset-args", json.dumps(args), "--model", DEMO_NAME,
                "--out", str(out), "--batch-size", "256", "--device", "cpu"])
    return TokenCacheDataset(out)


def train(a: argparse.Namespace, data: Mix) -> tuple[Path, float]:
    """The LoRA run: configs/lora.yaml with the demo's CPU settings (fp32, one micro-batch, its
    conditioning drops) and this run's rank, lr and steps. Returns the adapter folder and seconds."""
    tokens = NEW_TEXT[a.variant] if a.trainable_tokens else []
    out = a.work / (f"run-{a.variant}-r{a.r}-a{a.alpha:g}-lr{a.lr:g}-b{a.batch}-s{a.steps}-o{a.n_original}"
                    f"-t{len(tokens)}")
    if (out / "final" / "adapter_model.safetensors").exists():
        return out / "final", json.loads((out / "seconds.json").read_text())
    overrides = [f"model.init={DEMO_NAME}", "data.cache=mix", "data.val_size=64",
                 "model.gradient_checkpointing=false",
                 f"optim.lr={a.lr}", f"optim.warmup_steps={a.steps // 20}", "diffusion.cond_drop_prob=0.1",
                 "diffusion.cond_keep_prob=0.5", f"train.output_dir={out}", f"train.max_steps={a.steps}",
                 f"train.global_batch_size={a.batch}", f"train.micro_batch_size={a.batch}", "train.precision=fp32",
                 "train.device=cpu", f"lora.r={a.r}", f"lora.alpha={a.alpha}", "lora.dropout=0", "log.every=25",
                 f"lora.trainable_tokens={json.dumps(tokens)}",
                 "eval.every=0", "checkpoint.every=0", "checkpoint.keep_last=1", "checkpoint.resume=null"]
    start = time.perf_counter()
    result = Trainer(load_config(ROOT / "configs" / "lora.yaml", overrides), dataset=data).fit()
    seconds = time.perf_counter() - start
    (out / "seconds.json").write_text(json.dumps(seconds))
    return Path(result.final_dir), seconds


def score(a: argparse.Namespace, saved: dict, key: str, adapter: Path | None, variant: str | None) -> dict:
    """`evaluate_demo` of the demo (with `adapter` loaded) on `n_eval` held-out phantoms, kept in scores.json."""
    key = f"{key if adapter is None else adapter.parent.name}/{variant or 'original'}/n{a.n_eval}"
    if key not in saved:
        pipe = MeDiMPipeline.from_pretrained(DEMO_NAME)
        if adapter is not None:
            pipe.load_lora_weights(adapter).fuse_lora()
        scores = evaluate_demo(pipe, n=a.n_eval, variant=variant)
        print(f"{key}\n{scores_table(scores)}")
        saved[key] = {k: getattr(scores, k) for k in TASKS} | {"effusion": scores.effusion}
        (a.work / "scores.json").write_text(json.dumps(saved, indent=1))
    return saved[key]


def vqgan_ceiling(n: int, variant: str) -> dict:
    """The demo's VQGAN round trip (encode, decode) of the held-out variant phantoms, read back:
    what perfect image codes would score in text -> image (the adapter cannot change the VQGAN)."""
    vqgan = MeDiMPipeline.from_pretrained(DEMO_NAME).vqgan
    images, _, truth = zip(*synthetic.make_dataset(n, seed=EVAL_SEED, size=IMAGE_SIZE, variant=variant))
    with torch.no_grad():
        decoded = postprocess(vqgan.decode(vqgan.encode(preprocess(list(images), size=IMAGE_SIZE))))
    scores = synthetic.compare([synthetic.read_image(im, variant=variant) for im in decoded], truth)
    return {"attributes": scores.attributes, "effusion": scores.effusion}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/adapt"), help="caches, run and scores.json")
    p.add_argument("--variant", choices=synthetic.VARIANTS, default="structured", help="the variant to adapt to")
    p.add_argument("--n-variant", type=int, default=8192, help="variant phantoms to fine-tune on")
    p.add_argument("--n-original", type=int, default=4096, help="original phantoms mixed in (0: none)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--n-eval", type=int, default=100, help="held-out phantoms per evaluation")
    p.add_argument("--no-trainable-tokens", dest="trainable_tokens", action="store_false",
                   help="do not train the token rows of the variant's new words (see NEW_TEXT)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 wait on each other on a shared machine)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    parts = [build_cache(a.work / f"cache-{a.variant}", a.n_variant, 1, a.variant)]
    if a.n_original:
        parts.append(build_cache(a.work / "cache-original", a.n_original, 0, None))
    adapter, seconds = train(a, Mix(*parts))
    saved = json.loads((a.work / "scores.json").read_text()) if (a.work / "scores.json").exists() else {}
    rows = [(f"{when} / {variant or 'original'}", score(a, saved, when, lora, variant))
            for variant in (a.variant, None) for when, lora in (("before", None), ("after", adapter))]
    new_text = NEW_TEXT[a.variant] if a.trainable_tokens else "none"
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    demo_bytes = (demo_path() / "model" / "model.safetensors").stat().st_size
    lines = [f"{'model / phantoms':<22}{'img->report':>12}{'text->img':>10}{'pairs':>7}{'effusion (3 tasks)':>22}",
             "-" * 73]
    for name, s in rows:
        eff = " / ".join(f"{s['effusion'][k]:.2f}" for k in TASKS) if s["effusion"] else "-"
        lines.append(f"{name:<22}{s['image_to_report']:>12.3f}{s['text_to_image']:>10.3f}{s['pairs']:>7.3f}{eff:>22}")
    ceiling = vqgan_ceiling(a.n_eval, a.variant)
    effusion = f", effusion {ceiling['effusion']:.2f}" if a.variant == "effusion" else ""
    lines += [f"VQGAN round trip of the {a.variant} phantoms (ceiling of text->img): attributes "
              f"{ceiling['attributes']:.3f}{effusion}",
              f"n={a.n_eval} held-out phantoms per row; adapter {adapter_bytes} bytes = "
              f"{100 * adapter_bytes / demo_bytes:.1f} % of the demo's {demo_bytes}",
              f"LoRA r={a.r} alpha={a.alpha} lr={a.lr}, {a.steps} steps of {a.batch} on {a.n_variant} {a.variant} + "
              f"{a.n_original} original phantoms, token rows of {new_text}, {a.threads} threads: "
              f"{seconds / 60:.1f} min of training"]
    print("\n".join(lines))
    if not a.no_record:
        command = "python benchmarks/bench_adapt.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as f:
            f.write(f"\n## LoRA adaptation of the demo to {a.variant} phantoms (bench_adapt.py)\n\n"
                    f"- command: `{command}`\n"
                    f"- machine: {json.dumps(machine_info())}\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()

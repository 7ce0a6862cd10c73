"""Peak memory and time of loading a 10-of-28-layer truncation of a Liquid-format checkpoint.

    python benchmarks/bench_load.py                     # hidden 512, 28 layers, 4 shards (~0.4 GB)
    python benchmarks/bench_load.py --hidden 1024 --intermediate 8192

A random checkpoint in Liquid_V1_7B's file format (docs/formats.md, section 1: 4 bf16 shards + index,
GemmaForCausalLM keys, Liquid's config.json) is written at a reduced width, then loaded by
`MeDiMModel.from_liquid(num_layers=10, dtype=bfloat16)` in a fresh subprocess. Peak memory is
the high-water resident size (VmHWM = ru_maxrss, reset after the imports) minus the resident size
after the imports, against the bytes of the kept weights. The vocabulary keeps Liquid's proportions
(text + 8192 image codes, embedding ~1/4 of the kept weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, peak_memory, report, reset_peak_memory  # noqa: E402


def write_liquid_like(directory: Path, hidden: int, intermediate: int, layers: int, text_vocab: int,
                      shards: int = 4, seed: int = 0) -> int:
    """Random Liquid-format shards (layers split evenly, embedding in the first, norm in the last).
    Returns the bytes written."""
    g = torch.Generator().manual_seed(seed)
    heads, head_dim = max(1, hidden // 128), 128
    vocab = text_vocab + 8192

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    per_shard = -(-layers // shards)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, total = {}, 0
    for s, name in enumerate(names):
        part = {}
        if s == 0:
            part["model.embed_tokens.weight"] = rand(vocab, hidden)
        for n in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            p = f"model.layers.{n}."
            part.update({
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
                p + "input_layernorm.weight": rand(hidden),
                p + "post_attention_layernorm.weight": rand(hidden),
            })
        if s == shards - 1:
            part["model.norm.weight"] = rand(hidden)
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(v.numel() * 2 for v in part.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = dict(architectures=["GemmaForCausalLM"], model_type="gemma", hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, head_dim=head_dim, hidden_act="gelu", hidden_activation=None,
                  vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0, torch_dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config))
    return total


def child(path: str, num_layers: int, text_vocab: int) -> None:
    """Runs in the fresh subprocess: load and print one JSON line. The baseline is the resident
    size after the imports; the high-water mark is then reset (Linux clear_refs), so the import
    phase's own peak cannot hide the load's (ru_maxrss would keep it)."""
    import medim.models.convert  # noqa: F401  (every import the load needs, before the baseline)
    from medim.models.medim import MeDiMModel

    base = reset_peak_memory("cpu")
    start = time.perf_counter()
    model = MeDiMModel.from_liquid(path, num_layers=num_layers, dtype=torch.bfloat16, image_offset=text_vocab)
    seconds = time.perf_counter() - start
    peak = peak_memory("cpu") - base
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    print(json.dumps(dict(seconds=seconds, peak_bytes=peak, kept_bytes=sum(storages.values()))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--num-layers", type=int, default=10, help="layers kept")
    p.add_argument("--text-vocab", type=int, default=24576)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.num_layers, args.text_vocab)
        return 0
    if not 1 <= args.num_layers <= args.layers:
        raise SystemExit(f"--num-layers must lie in [1, --layers={args.layers}]")
    with tempfile.TemporaryDirectory() as tmp:
        written = write_liquid_like(Path(tmp), args.hidden, args.intermediate, args.layers, args.text_vocab)
        cmd = [sys.executable, __file__, "--child", tmp, "--num-layers", str(args.num_layers),
               "--text-vocab", str(args.text_vocab)]
        stdout = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(stdout.strip().splitlines()[-1])
    mb = 2**20
    row = dict(checkpoint_MB=written / mb, kept_MB=result["kept_bytes"] / mb, peak_rss_MB=result["peak_bytes"] / mb,
               peak_over_kept=result["peak_bytes"] / result["kept_bytes"], load_s=result["seconds"])
    settings = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, kept_layers=args.num_layers,
                    vocab=args.text_vocab + 8192, dtype="bfloat16", shards=4)
    report("Loading a truncated Liquid-format checkpoint", settings, [row], machine_info(),
           ["peak_rss = VmHWM (ru_maxrss, reset after imports) - VmRSS after imports, in a fresh subprocess"],
           results=None if args.no_record else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of `medim generate`: scaling over processes (torchrun), and pairs/s on a GPU.

    python benchmarks/bench_generate.py                          # CPU: 1 vs 2 processes, 1 thread each
    python benchmarks/bench_generate.py --processes 1,2,4 --pairs 32,160
    python benchmarks/bench_generate.py --gpu                    # CUDA: release shape, eager vs compiled
    python benchmarks/bench_generate.py --gpu --smoke            # (c)'s code path on CPU, shrunk, not recorded

a) Scaling (CPU, the bundled medim-demo model, its own sampler settings unless --num-inference-steps):
   the real command, `torchrun --standalone --nproc_per_node P -m medim generate pairs ...`, with
   OMP_NUM_THREADS=1, for the same total work at each P. pairs/s is the marginal rate between two
   request sizes, (N_large - N_small) / (wall_large - wall_small), so start-up (Python, torch,
   the model load, the rendezvous) cancels. The outputs of every P are compared byte for byte.
b) Decoding one image at a time (what makes pixels independent of batching, medim/pipelines/common.py
   `per_image`) against one batched decode: seconds per image.
c) --gpu: `pipe.generate_pairs` of a random-weight pipeline in the release's shape (Liquid cut to
   10 layers, 256 + 1024 tokens, Chameleon VQGAN at 512 px) at the release's sampler settings
   (128 maskgit steps, guidance 5), bf16, batch 8 and 32, eager and (when the pipeline has
   `compile`) compiled with CUDA graphs; pairs/s includes the VQGAN decode.
Results are printed and appended to benchmarks/RESULTS.md (`--no-record` to skip).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, medim_v1_model, report, timed  # noqa: E402

from medim.pipelines.common import per_image  # noqa: E402

logger = logging.getLogger("bench_generate")

PROMPTS = ["Frontal chest radiograph.", "Frontal view of the chest.", "A large dense nodule in the right upper zone.",
           "A small lucent lesion in the left lower zone."]


def generate_command(processes: int, model: str, prompts: Path, pairs: int, out: Path, steps: int | None,
                     batch: int) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "medim", "generate", "pairs", "--model", model, "--prompts", str(prompts),
               "--num-per-prompt", str(pairs // len(PROMPTS)), "--batch-size", str(batch), "--device", "cpu",
               "--out", str(out)]
    return command + (["--num-inference-steps", str(steps)] if steps else [])


def scaling(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    wall: dict[tuple[int, int], float] = {}
    for repeat in range(args.repeats):
        for processes in args.processes:
            for pairs in args.pairs:
                out = work / f"p{processes}-n{pairs}-r{repeat}"
                command = generate_command(processes, args.model, prompts, pairs, out, args.steps, args.batch)
                logger.info("%s", " ".join(command[1:]))
                start = time.perf_counter()
                subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seconds = time.perf_counter() - start
                wall[processes, pairs] = min(seconds, wall.get((processes, pairs), float("inf")))
    small, large = args.pairs
    reference = folder_bytes(work / f"p{args.processes[0]}-n{large}-r0")
    rows = []
    for processes in args.processes:
        rate = (large - small) / (wall[processes, large] - wall[processes, small])
        rows.append(dict(processes=processes, threads_per_process=1, pairs_small=small, pairs_large=large,
                         wall_small_s=wall[processes, small], wall_large_s=wall[processes, large], pairs_per_s=rate,
                         speedup=rate / rows[0]["pairs_per_s"] if rows else 1.0,
                         same_bytes_as_first=folder_bytes(work / f"p{processes}-n{large}-r0") == reference))
    return rows


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def decode_cost(pipe, batch: int, repeats: int) -> dict[str, Any]:
    """Seconds per image: one image at a time (`per_image`, one CPU thread on CPU) vs one batch."""
    vqgan, device = pipe.vqgan, pipe.vqgan.device
    codes = torch.randint(0, vqgan.num_codes, (batch, pipe.layout.image_segment.length),
                          generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        per_image(vqgan.decode, codes, device), vqgan.decode(codes)  # warm-up of both shapes
        one, _ = timed(lambda: per_image(vqgan.decode, codes, device), device, repeats)
        batched, _ = timed(lambda: vqgan.decode(codes), device, repeats)
    return dict(decode_batch=batch, resolution=pipe.image_resolution, device=str(device),
                per_image_s_per_image=one / batch, batched_s_per_image=batched / batch, ratio=one / batched)


def word_tokenizer(vocab_size: int = 32000):
    """A word-level fast tokenizer of `vocab_size` ids (Llama-2's size, BOS added) for a
    random-weight pipeline: every id decodes to a word, known words encode to their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *"0123456789", *"Image Size : Width is Height . , ( )".split()]
    words += sorted({w.strip(".,").lower() for p in PROMPTS for w in p.split()} - set(words))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def release_shape_pipeline(device: str, smoke: bool = False):
    """Random weights in the release's shapes (bf16, the VQGAN's codebook float32); `smoke`: the
    tiny width and a narrow VQGAN at the same 512 px, float32, for a CPU run of the code path."""
    from medim.diffusion.config import RELEASE_SAMPLER
    from medim.models.vqgan import VQGAN, VQGANConfig
    from medim.pipelines.pipeline import MeDiMPipeline

    model = medim_v1_model("tiny" if smoke else "liquid", device=device)
    narrow = dict(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=8) if smoke else {}
    with torch.device(device):
        vqgan = VQGAN(VQGANConfig(**narrow))
    pipe = MeDiMPipeline(model, vqgan.eval(), word_tokenizer(), RELEASE_SAMPLER)
    return pipe if smoke else pipe.to(dtype=torch.bfloat16)


def pairs_call(pipe, batch: int, steps: int, device: str):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
    return pipe.generate_pairs(prompts, num_inference_steps=steps, batch_size=batch, generator=generators)


def gpu_pairs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device = "cpu" if args.smoke else "cuda"
    pipe = release_shape_pipeline(device, args.smoke)
    pipe.set_progress_bar_config(disable=True)
    decode = decode_cost(pipe, 2 if args.smoke else 8, 2)
    rows = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            if not callable(getattr(pipe, "compile", None)):
                logger.info("this pipeline has no compile(): compiled rows skipped")
                break
            pipe.compile(mode=None if args.smoke else "reduce-overhead")
        for batch in args.gpu_batches:
            start = time.perf_counter()
            pairs_call(pipe, batch, 2, device)  # warm-up (compiled: the graphs of the guided step)
            warmup = time.perf_counter() - start
            seconds, out = timed(lambda b=batch: pairs_call(pipe, b, args.gpu_steps, device), device)
            rows.append(dict(mode=mode, batch=batch, steps=args.gpu_steps, nfe=out.nfe, seconds=seconds,
                             pairs_per_s=batch / seconds, warmup_s=warmup,
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None))
            logger.info("%s", rows[-1])
    return rows, decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="medim-demo", help="pipeline for the scaling runs")
    p.add_argument("--processes", default="1,2", help="process counts to compare (the first is the baseline)")
    p.add_argument("--pairs", default="24,120", help="the two request sizes (multiples of 4) of the marginal rate")
    p.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=None,
                   help="sampling steps (default: the model's own)")
    p.add_argument("--batch", type=int, default=8, help="--batch-size of each process")
    p.add_argument("--repeats", type=int, default=1, help="runs of each configuration (the fastest counts)")
    p.add_argument("--decode-batch", type=int, default=8, help="images of the decode comparison")
    p.add_argument("--gpu", action="store_true", help="measure (c) on CUDA instead of (a) and (b)")
    p.add_argument("--gpu-batches", default="8,32")
    p.add_argument("--gpu-steps", type=int, default=128, help="sampling steps of (c) (the release: 128)")
    p.add_argument("--smoke", action="store_true", help="with --gpu: run (c) shrunk on CPU (batches 2, 2 steps)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = None if args.no_record else RESULTS
    args.processes = [int(v) for v in args.processes.split(",")]
    args.pairs = [int(v) for v in args.pairs.split(",")]
    args.gpu_batches = [int(v) for v in args.gpu_batches.split(",")]
    if len(args.pairs) != 2 or args.pairs[0] >= args.pairs[1] or any(n % len(PROMPTS) for n in args.pairs):
        raise SystemExit(f"--pairs takes two sizes, small < large, multiples of {len(PROMPTS)}; got {args.pairs}")
    if min(args.processes) < 1 or args.batch < 1 or args.repeats < 1 or args.gpu_steps < 1:
        raise SystemExit("--processes, --batch, --repeats and --gpu-steps must be >= 1")

    if args.gpu:
        if args.smoke:
            args.gpu_batches, args.gpu_steps, record = [2], 2, None
        elif not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA (--smoke runs its code path on CPU)")
        info = machine_info("cpu" if args.smoke else "cuda")
        rows, decode = gpu_pairs(args)
        settings = dict(shape="tiny, narrow VQGAN (smoke)" if args.smoke else "liquid (random weights)",
                        dtype="float32" if args.smoke else "bfloat16", sampler="release (maskgit, guidance 5)",
                        steps=args.gpu_steps, task="generate_pairs")
        report("Generation: pairs/s on one GPU, eager vs compiled", settings, rows, info,
               ["pairs_per_s includes the VQGAN decode (one image at a time); warmup_s: a 2-step call first "
                "(compiles the graphs when compiled)", f"decode: {decode}"], results=record)
        return 0

    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_generate-") as tmp:
        rows = scaling(args, Path(tmp))
    info["load_average_end"] = machine_info()["load_average"]
    settings = dict(model=args.model, steps=args.steps or "model's", batch=args.batch, repeats=args.repeats,
                    launcher="torchrun --standalone", omp_num_threads=1)
    report("Generation: scaling over processes (medim generate under torchrun, cpu)", settings, rows, info,
           ["pairs_per_s = (pairs_large - pairs_small) / (wall_large_s - wall_small_s): start-up cancels",
            "same_bytes_as_first: every output file and manifest.jsonl equal to the first process count's"],
           results=record)

    from medim.pipelines.pipeline import MeDiMPipeline

    pipe = MeDiMPipeline.from_pretrained(args.model)
    threads = torch.get_num_threads()
    decode = decode_cost(pipe, args.decode_batch, max(args.repeats, 3))
    report("Generation: VQGAN decode one image at a time vs batched (cpu)", dict(model=args.model, threads=threads),
           [decode], machine_info(), ["per_image: one image per call on one thread (medim/pipelines/common.py); "
                                      f"batched: all {args.decode_batch} in one call on {threads} threads"],
           results=record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the benchmark scripts: random models in the medim-v1 shape, the release-style
sampling loop they are compared against, timing, machine info, tables and RESULTS.md.

Run the scripts from the repository root (`python benchmarks/bench_sampler.py`); they import this
module from their own folder.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GemmaConfig

from medim.diffusion.sampler import commit_counts
from medim.diffusion.schedule import get_schedule
from medim.layout import MeDiMV1Layout
from medim.models.backbone import liquid_backbone_config
from medim.models.medim import MeDiMConfig, MeDiMModel

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Model sizes. "liquid" is Liquid_V1_7B cut to 10 layers with the release's 40196-row table
# (docs/formats.md, sections 1 and 4); the others keep its vocabulary and sequence shape at a small width.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=16),
    "tiny128": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, head_dim=32),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, head_dim=64),
    "medium": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, head_dim=64),
    "liquid": dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=10, num_attention_heads=16,
                   head_dim=256),
}


def medim_v1_model(size: str = "tiny", text_len: int = 256, image_len: int = 1024, base_vocab: int = 32000,
                   image_vocab: int = 8192, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0, num_layers: int | None = None) -> MeDiMModel:
    """A random-weight MeDiM in the medim-v1 layout (default: the release's 256 + 1024 tokens and
    40196-row vocabulary), built directly on `device` in `dtype` (`num_layers`: the size's unless given)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    layout = MeDiMV1Layout(base_vocab_size=base_vocab, text_len=text_len, image_len=image_len,
                           image_vocab_size=image_vocab)
    params = {**liquid_backbone_config(10, layout.min_vocab_size).to_dict(), **SIZES[size]}
    params["num_key_value_heads"] = params["num_attention_heads"]
    if num_layers is not None:
        params["num_hidden_layers"] = num_layers
    backbone = GemmaConfig.from_dict(params)
    torch.manual_seed(seed)
    with torch.device(device):
        model = MeDiMModel(MeDiMConfig(backbone, layout=layout.to_dict()))
    # Random (not identity) modulation, so every part of the block does real work.
    with torch.no_grad():
        for layer in model.layers:
            layer.adaLN_modulation.weight.normal_(0, 0.02)
    return model.to(dtype).eval()


def text_to_image_batch(layout: MeDiMV1Layout, batch: int, device: str | torch.device = "cpu", seed: int = 0,
                        cond_len: int = 24) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Random reports of 60-200 tokens (right-padded, like real ones), image unknown, and the
    size-string condition: (x, known, condition)."""
    g = torch.Generator().manual_seed(seed)
    T, text = layout.text_len, layout.text_segment
    lengths = torch.randint(min(60, T), min(200, T) + 1, (batch,), generator=g)
    ids = torch.randint(3, text.vocab_size, (batch, T), generator=g)
    ids = torch.where(torch.arange(T)[None] < lengths[:, None], ids, layout.pad_id)
    x = torch.full((batch, layout.state_len), layout.mask_id, dtype=torch.long)
    x[:, :T] = ids
    known = torch.zeros_like(x, dtype=torch.bool)
    known[:, :T] = True
    cond = {"cond_ids": torch.randint(3, text.vocab_size, (batch, cond_len), generator=g),
            "cond_mask": torch.ones(batch, cond_len, dtype=torch.bool)}
    return x.to(device), known.to(device), {k: v.to(device) for k, v in cond.items()}


def task_batch(layout: MeDiMV1Layout, task: str, batch: int, device: str | torch.device = "cpu", seed: int = 0,
               cond_len: int = 24) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x, known, condition) of a random batch for "text_to_image" (`text_to_image_batch`),
    "image_to_report" (random image codes known, every report slot unknown, as the release fills
    them) or "pairs" (a 4-token prompt known, everything else unknown)."""
    x, known, cond = text_to_image_batch(layout, batch, device, seed, cond_len)
    if task == "text_to_image":
        return x, known, cond
    T, image = layout.text_len, layout.image_segment
    g = torch.Generator().manual_seed(seed + 1)
    if task == "image_to_report":
        codes = torch.randint(0, image.vocab_size, (batch, image.length), generator=g) + image.vocab_start
        x[:, T:] = codes.to(x.device)
        known = torch.zeros_like(known)
        known[:, T:] = True
    elif task == "pairs":
        known = torch.zeros_like(known)
        known[:, :4] = True
    else:
        raise ValueError(f"task must be text_to_image, image_to_report or pairs, got {task!r}")
    return torch.where(known, x, layout.mask_id), known, cond


@torch.no_grad()
def release_style_sample(model: MeDiMModel, x: torch.Tensor, known: torch.Tensor, condition: dict[str, torch.Tensor],
                         num_inference_steps: int, guidance_scale: float, generators: Sequence[torch.Generator],
                         confidence_temperature: float = 10.0) -> torch.Tensor:
    """The released sampler's way of working: one sample at a time, the unconditional pass as its
    own forward, logits over the whole vocabulary at every backbone position, then docs/formats.md
    section 4's maths (mask id -> -inf, the modality's ids only, log-softmax, CFG (1 + w) c - w u
    with w = cfg (1 - t), sample, confidence log p + 10 t Gumbel, commit the arccos counts).

    It draws its random numbers exactly like `medim.diffusion.sample` with one generator per row,
    so both give the same tokens; only the work done differs.
    """
    layout = model.layout
    out = []
    t_grid = torch.linspace(1, 1e-5, num_inference_steps + 1)
    sigma = get_schedule("loglinear").sigma(t_grid)
    for r in range(x.shape[0]):
        xr, kr = x[r : r + 1].clone(), known[r : r + 1]
        cond = {k: v[r : r + 1] for k, v in condition.items()}
        counts = commit_counts((~kr).sum(-1).cpu(), num_inference_steps)[0].tolist()
        for i in range(num_inference_steps):
            t, w = t_grid[i].item(), guidance_scale * (1 - t_grid[i].item())
            u = torch.rand(2, xr.shape[1], generator=generators[r], device=generators[r].device).to(xr.device)
            if counts[i] == 0:
                continue

            lp = _full_logprobs(model, xr, sigma[i : i + 1], cond)
            if w > 0 and bool(kr.any()):
                lpu = _full_logprobs(model, torch.where(kr, layout.mask_id, xr), sigma[i : i + 1], cond)
                # Mix only the allowed ids: (1 + w)(-inf) - w(-inf) would be NaN.
                lp = torch.where(lp.isfinite(), (1 + w) * lp - w * lpu, -math.inf).log_softmax(-1)
            cdf = lp.exp().cumsum(-1)
            cand = torch.searchsorted(cdf, (u[0] * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True)
            cand = cand.squeeze(-1).clamp(max=lp.shape[-1] - 1)
            lp_cand = lp.gather(-1, cand[..., None]).squeeze(-1)
            masked = xr == layout.mask_id
            gumbel = -torch.log(-torch.log(u[1].clamp(1e-20, 1 - 1e-7)))
            conf = torch.where(masked, lp_cand + confidence_temperature * t * gumbel, -math.inf)
            order = conf.argsort(dim=-1, descending=True, stable=True)[0, : counts[i]]
            xr[0, order] = cand[0, order]
        out.append(xr)
    return torch.cat(out)


def _full_logprobs(model: MeDiMModel, state: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """Release read-out: whole-vocabulary logits at every backbone position, mapped to the state,
    mask id and other-modality ids -> -inf, log-softmax over the full width."""
    layout = model.layout
    inp = layout.backbone_inputs(state, **cond)
    logits = model.backbone_logits(inp.input_ids, sigma.to(state.device), inp.position_ids, inp.key_mask)
    logits[..., layout.mask_id] = -math.inf
    logits = logits.gather(1, inp.out_index[..., None].expand(-1, -1, logits.shape[-1]))
    return _restrict(logits, layout).log_softmax(-1)


def _restrict(logits: torch.Tensor, layout: MeDiMV1Layout) -> torch.Tensor:
    """Text positions may only take text ids, image positions only image ids (full-width rows)."""
    text, image = layout.text_segment, layout.image_segment
    ids = torch.arange(logits.shape[-1], device=logits.device)
    ok_text = (ids >= text.vocab_start) & (ids < text.vocab_stop)
    ok_image = (ids >= image.vocab_start) & (ids < image.vocab_stop)
    allowed = torch.cat([ok_text.expand(text.length, -1), ok_image.expand(image.length, -1)])
    return logits.masked_fill(~allowed, -math.inf)


def forward_flops(model: MeDiMModel, rows: int, queries: int, keys: int, outputs: dict[str, int]) -> int:
    """Network FLOPs (2 per multiply-add) of one forward of `rows` rows in which `queries` backbone
    positions run through every layer attending over `keys` (a whole forward: both the sequence
    length; a context-cached step: its active positions and the whole sequence), with the head at
    `outputs[segment]` positions of each segment. Counts every matrix product: timestep embedder,
    AdaLN, q/k/v/o projections, attention scores and mix, the gated MLP, the head."""
    b, c = model.config.backbone_config, model.config
    d, heads, kv = b.hidden_size, b.num_attention_heads, b.num_key_value_heads
    head_dim = getattr(b, "head_dim", None) or d // heads
    per_token = d * (heads + 2 * kv) * head_dim + heads * head_dim * d + 3 * d * b.intermediate_size
    attention = 2 * heads * head_dim * keys
    per_row = c.frequency_embedding_size * d + d * d + b.num_hidden_layers * 6 * d * d  # sigma embedding, AdaLN
    segments = {s.name: s for s in model.layout.segments}
    head = sum(n * d * segments[name].vocab_size for name, n in outputs.items())
    return 2 * rows * (per_row + b.num_hidden_layers * queries * (per_token + attention) + head)


class FlopMeter:
    """Adds up `forward_flops` of every forward `model` runs inside `with FlopMeter(model) as meter:`
    (`forward` and `forward_cached`, as the pipeline's denoiser calls them); `meter.flops`, `meter.calls`."""

    def __init__(self, model: MeDiMModel):
        self.model, self.flops, self.calls = model, 0, 0

    def _count(self, x: torch.Tensor, positions: dict | None, condition: dict, queries: int | None) -> None:
        layout = self.model.layout
        keys = layout.backbone_inputs(x[:1], **{k: v[:1] for k, v in condition.items()}).input_ids.shape[1]
        outputs = {s.name: s.length for s in layout.segments} if positions is None else {
            name: p.numel() for name, p in positions.items()}
        self.flops += forward_flops(self.model, x.shape[0], queries or keys, keys, outputs)
        self.calls += 1

    def __enter__(self) -> FlopMeter:
        model = self.model
        forward, cached = model.forward, model.forward_cached

        def counted_forward(x, sigma, positions=None, return_logits=False, **condition):
            self._count(x, positions, condition, None)
            return forward(x, sigma, positions=positions, return_logits=return_logits, **condition)

        def counted_cached(x, sigma, positions, cache=None, return_logits=False, **condition):
            self._count(x, positions, condition, None if cache is None else cache.active.shape[1])
            return cached(x, sigma, positions, cache, return_logits=return_logits, **condition)

        model.forward, model.forward_cached = counted_forward, counted_cached
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.forward, self.model.forward_cached  # the class's methods again


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 1) -> tuple[float, Any]:
    """Seconds per call (mean of `repeats`, after the caller's own warm-up) and the last result."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, result


def rss_kib(field: str = "VmRSS") -> int:
    """A field of /proc/self/status in KiB (Linux): VmRSS (resident now), VmHWM (peak = ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory(device: torch.device | str) -> int:
    """Start a peak-memory window; returns the baseline in bytes (CUDA: allocated; CPU: resident,
    with the high-water mark reset through /proc/self/clear_refs so earlier peaks do not hide it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS") * 1024


def peak_memory(device: torch.device | str) -> int:
    """Peak bytes since `reset_peak_memory` (CUDA: allocated tensors; CPU: resident set)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return rss_kib("VmHWM") * 1024


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and when a number was measured (with the load average: the machine may be shared)."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys -> a markdown table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(title: str, settings: dict[str, Any], rows: Sequence[dict[str, Any]], info: dict[str, Any],
           notes: Sequence[str] = (), results: Path | None = RESULTS) -> str:
    """Print a titled table and append it (with the command, machine and settings) to RESULTS.md."""
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text = (f"\n## {title}\n\n`{command}`\n\n- machine: {json.dumps(info)}\n- settings: {json.dumps(settings)}\n"
            + "".join(f"- {n}\n" for n in notes) + "\n" + markdown_table(rows))
    print(text)
    if results is not None:
        with open(results, "a") as f:  # append-only log: a partial line is impossible to misread
            f.write(text)
    return text

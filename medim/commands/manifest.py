"""The manifest of a `medim generate` folder: the finished samples, one JSON line each, in
`manifest.jsonl` and (while a torchrun job runs) one `manifest.rank<r>.jsonl` part per rank, which
rank 0 merges in index order.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
# Settings that change what a sample looks like: a resumed run must use the same ones.
SETTING_KEYS = (
    "task", "model", "loader", "revision", "num_inference_steps", "guidance_scale", "strategy", "temperature",
    "top_k", "top_p", "cache_interval", "order", "image_size", "prompt", "dtype", "seed", "num_per_prompt",
    "mask_dilation",
)
# What a killed run can leave in the folder: the temporary files of the atomic writers.
LEFTOVER = re.compile(r"\.(\d{6,}\.(png|txt)|manifest(\.rank\d+)?\.jsonl)\..+")


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Where a rank lists the samples it finished: manifest.jsonl itself when it is alone."""
    return out / (MANIFEST if world_size == 1 else f"manifest.rank{rank}.jsonl")


def collect(out: Path) -> tuple[dict[int, str], bool]:
    """Every finished sample's manifest line by index, from manifest.jsonl and any rank parts, and
    whether manifest.jsonl must be rewritten (parts to merge, a line cut short by a kill, or
    lines out of index order after a resume)."""
    lines: dict[int, str] = {}
    parts = sorted(out.glob("manifest.rank*.jsonl"))
    files, dirty = [out / MANIFEST, *parts], bool(parts)
    last = -1
    for path in files:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                index = int(json.loads(line)["index"])
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: dropping an incomplete line left by an interrupted run", path)
                dirty = True
                continue
            dirty |= index <= last  # a duplicate (a merge stopped before removing a part) or out of order
            last = max(last, index)
            lines.setdefault(index, line)
        dirty |= bool(text) and not text.endswith("\n")
    return lines, dirty


def merge(out: Path, lines: dict[int, str]) -> None:
    """Write `lines` as manifest.jsonl in index order (atomically), then remove the rank parts."""
    from medim.utils.hub import atomic_file

    with atomic_file(out / MANIFEST) as f:
        f.writelines(lines[i] + "\n" for i in sorted(lines))
    for part in out.glob("manifest.rank*.jsonl"):
        part.unlink()


def source_of(entry: dict):
    """What a sample was made from: its prompt, its source image, or (inpaint) [image, mask, prompt]."""
    if "mask" in entry:
        return [entry.get("source_image"), entry["mask"], entry.get("prompt")]
    return entry.get("source_image", entry.get("prompt"))


def prepare(out: Path, settings: dict, inputs: list, num_per_prompt: int) -> None:
    """Before any rank starts (rank 0): refuse a folder made with other settings or inputs, remove
    what a killed run left half-written, and merge the manifest parts."""
    out.mkdir(parents=True, exist_ok=True)
    for path in out.iterdir():
        if LEFTOVER.fullmatch(path.name):
            path.unlink()
    lines, dirty = collect(out)
    total = len(inputs) * num_per_prompt
    for line in lines.values():
        entry = json.loads(line)
        old = {k: entry.get("settings", {}).get(k) for k in SETTING_KEYS}
        if old != settings:
            changed = sorted(k for k in SETTING_KEYS if old[k] != settings[k])
            raise SystemExit(
                f"{out} holds samples made with other settings ({', '.join(changed)}); "
                "use the same options to resume or a new --out"
            )
        source = source_of(entry)
        if entry["index"] >= total or source != inputs[entry["index"] // num_per_prompt]:
            raise SystemExit(f"{out}: sample {entry['index']} was made from other inputs ({source!r}); "
                             "use the same --prompts/--images/--masks/--num-per-prompt to resume, or a new --out")
    if dirty:
        merge(out, lines)

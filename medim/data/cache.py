"""The token cache: every image encoded once by the VQGAN and every report tokenised for the layout,
so training reads small integer tensors instead of decoding JPEGs and running the VQGAN each step.

On disk (no pickle):
  index.json                 format, layout, tokenizer, VQGAN config, image size, finished shards
  shard_00000.safetensors    image_codes [n, image_len] int16 (int32 if the codebook needs it),
                             text_ids [n, text_len] int32, sizes [n, 2] int32 (original width,
                             height), prefix_len [n] int32 (tokens of the report's first sentence);
                             the item ids in the metadata ("ids", JSON list)
Shard k holds the good items among dataset items [k * shard_size, (k + 1) * shard_size). Each shard
is written atomically and only then listed in index.json, so an interrupted run resumes after the
last listed shard without redoing any.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from medim.data.datasets import PairLoadError
from medim.data.images import preprocess
from medim.hub import atomic_file
from medim.layout import SequenceLayout

logger = logging.getLogger(__name__)

__all__ = ["build_token_cache", "TokenCacheDataset", "CacheSummary", "first_sentence_length"]

FORMAT = "medim-token-cache"
VERSION = 1
INDEX = "index.json"


@dataclass
class CacheSummary:
    """What `build_token_cache` did: items cached in all, skipped items by reason (including those
    the dataset dropped while indexing), shards written by this call and shards found finished."""

    path: Path
    num_items: int
    skipped: dict[str, int]
    shards_written: int
    shards_reused: int


def first_sentence_length(layout: SequenceLayout, tokenizer: Any, reports: list[str]) -> torch.Tensor:
    """Leading text tokens of each encoded report that belong to its first sentence (through the
    first '.'), as the longest common prefix of the encodings of the report and of that sentence."""
    sentences = [_first_sentence(r) for r in reports]
    full = layout.encode_reports(tokenizer, reports)
    head = layout.encode_reports(tokenizer, sentences)
    ignore = torch.tensor([layout.pad_id] + ([layout.eos_id] if layout.eos_id is not None else []))
    same = (full == head) & ~torch.isin(head, ignore)
    # cumprod stops counting at the first difference
    return same.long().cumprod(1).sum(1).to(torch.int32)


def _first_sentence(text: str) -> str:
    m = re.search(r"\.(\s|$)", text)
    return text[: m.start() + 1] if m else text


def _read_index(out: Path) -> dict | None:
    path = out / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass overwrite=True to rebuild the cache") from e
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a medim token cache index (format={index.get('format')!r})")
    return index


def _write_index(out: Path, index: dict) -> None:
    with atomic_file(out / INDEX) as f:
        json.dump(index, f, indent=1)


def build_token_cache(
    dataset: torch.utils.data.Dataset,
    out_dir: str | os.PathLike,
    *,
    vqgan: torch.nn.Module,
    tokenizer: Any,
    layout: SequenceLayout,
    tokenizer_name: str = "",
    shard_size: int = 1024,
    batch_size: int = 16,
    resize: str = "pad",
    overwrite: bool = False,
    show_progress: bool = True,
) -> CacheSummary:
    """Encode a paired dataset (`medim.data.datasets`: `dataset[i]` -> {"id", "image", "report", ...})
    into a token cache.

    Images are preprocessed to the square size the layout needs (`sqrt(image_len) * f` pixels) and
    encoded in batches on the VQGAN's device. Items whose image cannot be read or preprocessed are
    skipped and counted (`PairLoadError` from the dataset, or a preprocessing error). Re-running on the same `out_dir` resumes after the last finished shard.

    Example:
        >>> vqgan = VQGAN.from_pretrained("runs/base", subfolder="vqgan", device="cuda")
        >>> build_token_cache(build_dataset("jsonl", manifest="train.jsonl"), "cache/train",
        ...                   vqgan=vqgan, tokenizer=tok, layout=layout)
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    side = math.isqrt(layout.image_len)
    if side * side != layout.image_len:
        raise ValueError(f"layout.image_len={layout.image_len} is not a square number of codes")
    image_size = side * vqgan.downsample_factor
    code_dtype = torch.int16 if vqgan.num_codes <= 2**15 else torch.int32
    out = Path(out_dir)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "layout": layout.to_dict(),
        "tokenizer": tokenizer_name,
        "vqgan": vqgan.config.to_dict(),
        "image_size": image_size,
        "resize": resize,
        "shard_size": shard_size,
    }
    index = None if overwrite else _read_index(out)
    if index is not None:
        differs = [k for k, v in header.items() if index.get(k) != v]
        if differs:
            raise ValueError(f"{out} holds a cache built with other settings ({differs}); "
                             "pass overwrite=True to rebuild it or choose another out_dir")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty and holds no token cache; pass overwrite=True")
    if index is None or overwrite:
        if out.is_dir():
            for p in out.glob("shard_*.safetensors"):
                p.unlink()
        index = {**header, "shards": [], "complete": False}
        out.mkdir(parents=True, exist_ok=True)
        _write_index(out, index)
    if index["complete"]:
        logger.info("token cache %s is already complete", out)
        return _summary(out, index, written=0, reused=len(index["shards"]))

    reused = len(index["shards"])
    start = sum(sh["items_read"] for sh in index["shards"])
    index["index_skipped"] = dict(getattr(dataset, "skipped", {}))  # dropped while indexing
    bar = tqdm(total=len(dataset), initial=start, desc="caching", unit="item", disable=not show_progress)
    written = 0
    for first in range(start, len(dataset), shard_size):
        rows = range(first, min(first + shard_size, len(dataset)))
        tensors, ids, skipped = _encode_shard(dataset, rows, vqgan, tokenizer, layout, image_size, resize,
                                              batch_size, code_dtype)
        name = f"shard_{len(index['shards']):05d}.safetensors"
        if ids:
            with atomic_file(out / name, mode="wb") as f:
                f.write(save(tensors, metadata={"ids": json.dumps(ids)}))
        index["shards"].append({"file": name if ids else None, "num_items": len(ids),
                                "items_read": len(rows), "skipped": skipped})
        _write_index(out, index)  # only now is the shard part of the cache
        written += 1
        bar.update(len(rows))
    bar.close()
    index["complete"] = True
    _write_index(out, index)
    summary = _summary(out, index, written=written, reused=reused)
    logger.info("token cache %s: %d items, skipped %s", out, summary.num_items, summary.skipped)
    return summary


def _summary(out: Path, index: dict, written: int, reused: int) -> CacheSummary:
    skipped = Counter(index.get("index_skipped", {}))
    for shard in index["shards"]:
        skipped.update(shard["skipped"])
    return CacheSummary(
        path=out,
        num_items=sum(sh["num_items"] for sh in index["shards"]),
        skipped=dict(skipped),
        shards_written=written,
        shards_reused=reused,
    )


def _encode_shard(dataset, rows, vqgan, tokenizer, layout, image_size, resize, batch_size, code_dtype):
    codes, texts, sizes, prefix, ids = [], [], [], [], []
    skipped: Counter = Counter()
    pending: list[tuple[dict, torch.Tensor, tuple[int, int]]] = []

    def flush() -> None:
        pixels = torch.cat([p for _, p, _ in pending]).to(vqgan.device, vqgan.dtype)
        codes.append(vqgan.encode(pixels).cpu().to(code_dtype))
        reports = [it["report"] for it, _, _ in pending]
        texts.append(layout.encode_reports(tokenizer, reports).to(torch.int32))
        prefix.append(first_sentence_length(layout, tokenizer, reports))
        sizes.append(torch.tensor([list(sz) for _, _, sz in pending], dtype=torch.int32))
        ids.extend(str(it["id"]) for it, _, _ in pending)
        pending.clear()

    for i in rows:
        try:
            item = dataset[i]
            pixels, size = preprocess([item["image"]], size=image_size, resize=resize, return_sizes=True)
        except PairLoadError as e:
            logger.warning("skipping item %d: %s", i, e)
            skipped[e.reason] += 1
            continue
        except (OSError, ValueError, TypeError) as e:
            logger.warning("skipping item %d: cannot preprocess its image: %s", i, e)
            skipped["bad_image"] += 1
            continue
        pending.append((item, pixels, size[0]))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not ids:
        return {}, [], dict(skipped)
    tensors = {
        "image_codes": torch.cat(codes),
        "text_ids": torch.cat(texts),
        "sizes": torch.cat(sizes),
        "prefix_len": torch.cat(prefix),
    }
    return tensors, ids, dict(skipped)


class TokenCacheDataset(torch.utils.data.Dataset):
    """A finished token cache, held in memory (about 2 KB per pair at 1024 codes + 256 text ids).

    `dataset[i]` is a dict of tensors; `dataset.batch(indices)` gathers several at once, with the
    diffusion state `x0` [B, text_len + image_len] built for the cache's layout.

    Example:
        >>> data = TokenCacheDataset("cache/train")
        >>> batch = data.batch([0, 1, 2])
        >>> batch["x0"].shape
        torch.Size([3, 1280])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = _read_index(self.path)
        if index is None:
            raise FileNotFoundError(f"{self.path} holds no token cache ({INDEX} missing); build it with `medim cache`")
        if not index["complete"]:
            raise ValueError(f"token cache {self.path} is unfinished; re-run `medim cache` to complete it")
        self.index = index
        self.layout = SequenceLayout.from_dict(index["layout"])
        parts: dict[str, list[torch.Tensor]] = {}
        self.ids: list[str] = []
        for shard in index["shards"]:
            if shard["file"] is None:
                continue
            file = self.path / shard["file"]
            for key, t in load_file(str(file)).items():
                parts.setdefault(key, []).append(t)
            with safe_open(str(file), framework="pt") as f:
                self.ids.extend(json.loads(f.metadata()["ids"]))
        if not self.ids:
            raise ValueError(f"token cache {self.path} holds no items")
        self.tensors = {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.tensors.items()} | {"id": self.ids[i]}

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Gather rows: `x0` (the clean state), `sizes`, `prefix_len`."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        text = self.tensors["text_ids"][idx].long()
        image = self.tensors["image_codes"][idx].long() + self.layout.image_segment.vocab_start
        return {
            "x0": torch.cat([text, image], dim=1),
            "sizes": self.tensors["sizes"][idx],
            "prefix_len": self.tensors["prefix_len"][idx].long(),
        }

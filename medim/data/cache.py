"""The token cache: every image encoded once by the VQGAN and every report tokenised for the layout,
so training reads small integer tensors instead of decoding JPEGs and running the VQGAN each step.

On disk (no pickle):
  index.json                 the fingerprint of every input that decides the contents (data source
                             and item count, layout, VQGAN config + sha256 of its weights, sha256
                             of the tokenizer, image size, resize mode, shard size; the dataset's own
                             fingerprint where it has one), finished shards
  shard_00000.safetensors    image_codes [n, image_len] int16 (int32 if the codebook needs it),
                             text_ids [n, text_len] int32, sizes [n, 2] int32 (original width,
                             height), prefix_len [n] int32 (tokens of the report's first sentence);
                             the item ids in the metadata ("ids", JSON list)
Shard k holds the good items among dataset items [k * shard_size, (k + 1) * shard_size). Each shard
is written atomically and only then listed in index.json, so an interrupted run resumes after the
last listed shard without redoing any; a re-run whose fingerprint differs is refused (it would mix
two datasets, or two tokenizations, in one cache).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from medim.data.datasets import PairLoadError, dataset_length, item_loaders
from medim.data.images import RESIZE_MODES, preprocess
from medim.layout import SequenceLayout
from medim.utils.checks import check_choice, check_int
from medim.utils.hub import atomic_file

logger = logging.getLogger(__name__)

__all__ = ["build_token_cache", "TokenCacheDataset", "CacheSummary", "first_sentence_length"]

FORMAT = "medim-token-cache"
VERSION = 2  # 2: the header holds the fingerprint of the inputs (version 1 caches still load)
INDEX = "index.json"
# Header entries that describe but do not decide the contents: not compared on resume.
INFO_KEYS = ("tokenizer",)
# Header entry of a dataset that identifies its own data (`fingerprint`, e.g. the hf kind's).
FINGERPRINT = "dataset_fingerprint"


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
    """Leading text tokens of each encoded report that belong to its first sentence, the release's
    rule: the text before the first "." anywhere in the report, without the period (a report with
    no "." is all first sentence). Counted as the longest common prefix of the encodings of the
    report and of that text, so a token that straddles the cut is not kept."""
    sentences = [_first_sentence(r) for r in reports]
    full = layout.encode_reports(tokenizer, reports)
    head = layout.encode_reports(tokenizer, sentences)
    ignore = torch.tensor([layout.pad_id] + ([layout.eos_id] if layout.eos_id is not None else []))
    same = (full == head) & ~torch.isin(head, ignore)
    # cumprod stops counting at the first difference
    return same.long().cumprod(1).sum(1).to(torch.int32)


def _first_sentence(text: str) -> str:
    # The release: report[:report.find(".")].strip(). Where there is no ".", find gives -1 and the
    # release dropped the report's last character by accident; the whole report is kept here.
    cut = text.find(".")
    return (text[:cut] if cut >= 0 else text).strip()


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes and bytes): the identity of its weights."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: its serialised fast tokenizer (vocabulary,
    normaliser, pre-tokeniser, post-processor, added tokens) or else its vocabulary, and its
    special tokens. Independent of the folder or class name it was loaded under."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((text + specials).encode()).hexdigest()


def _differences(cached: Any, now: Any, key: str = "") -> list[str]:
    """Each leaf of two JSON values that differs, as "key.path: cached value in the cache, value now"."""
    if isinstance(cached, dict) and isinstance(now, dict):
        return [line for k in sorted(cached.keys() | now.keys())
                for line in _differences(cached.get(k), now.get(k), f"{key}.{k}" if key else k)]
    if cached == now:
        return []
    return [f"{key}: {_shown(cached)} in the cache, {_shown(now)} now"]


def _shown(value: Any, limit: int = 100) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_index(out: Path) -> dict | None:
    path = out / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass overwrite=True to rebuild the cache") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path} is not a medim token cache index (format={found!r})")
    return index


def write_index(out: Path, index: dict) -> None:
    with atomic_file(out / INDEX) as f:
        json.dump(index, f, indent=1)


def build_token_cache(
    dataset: torch.utils.data.Dataset,
    out_dir: str | os.PathLike,
    *,
    vqgan: torch.nn.Module,
    tokenizer: Any,
    layout: SequenceLayout,
    source: Mapping[str, Any] | None = None,
    tokenizer_name: str = "",
    shard_size: int = 1024,
    batch_size: int = 16,
    resize: str = "pad",
    overwrite: bool = False,
    show_progress: bool = True,
) -> CacheSummary:
    """Encode a paired dataset (`medim.data.datasets`: `dataset[i]` -> {"id", "image", "report", ...},
    or a streamed one, read in order) into a token cache.

    Images are preprocessed to the square size the layout needs (`sqrt(image_len) * f` pixels) and
    encoded in batches on the VQGAN's device. Items whose image cannot be read or preprocessed are
    skipped and counted (`PairLoadError` from the dataset, or a preprocessing error).

    Re-running on the same `out_dir` resumes after the last finished shard, if the cache was built
    from the same inputs: index.json records `source`, the dataset's length, the layout, the VQGAN
    (config and sha256 of its weights), the tokenizer (sha256), image size, `resize` and
    `shard_size`, and a re-run where any of them differs is refused with the differences listed
    (`overwrite=True` rebuilds). `source` says what the dataset is, e.g. `{"kind": "jsonl",
    "args": {"manifest": "/data/train.jsonl"}}` (`medim cache` records its --dataset,
    --dataset-args and --data-root); without it only the dataset's length identifies the data.
    A dataset with a `fingerprint` (the `hf` kind: its data and column mapping) has it recorded and
    compared too; a streamed dataset without one cannot be resumed.
    `tokenizer_name` is recorded for people to read, not compared.

    Example:
        >>> vqgan = VQGAN.from_pretrained("runs/base", subfolder="vqgan", device="cuda")
        >>> build_token_cache(build_dataset("jsonl", manifest="train.jsonl"), "cache/train",
        ...                   vqgan=vqgan, tokenizer=tok, layout=layout,
        ...                   source={"kind": "jsonl", "args": {"manifest": "train.jsonl"}})
    """
    check_int(shard_size, "shard_size", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_choice(resize, "resize", RESIZE_MODES)  # else every item would be skipped as a bad image
    if source is not None and not isinstance(source, Mapping):
        raise TypeError(f"source must be a dict describing the dataset or None, got {type(source).__name__}")
    side = math.isqrt(layout.image_len)
    if side * side != layout.image_len:
        raise ValueError(f"layout.image_len={layout.image_len} is not a square number of codes")
    encoder = _ShardEncoder(vqgan, tokenizer, layout, image_size=side * vqgan.downsample_factor, resize=resize,
                            batch_size=batch_size)
    header = _header(dataset, encoder, source=source, tokenizer_name=tokenizer_name, shard_size=shard_size)
    out = Path(out_dir)
    index = _open_index(out, header, overwrite=overwrite)
    if index["complete"]:
        logger.info("token cache %s is already complete", out)
        return _summary(out, index, written=0, reused=len(index["shards"]))
    reused = len(index["shards"])
    if reused:
        _check_resumable(out, index, dataset)
    written = _write_shards(dataset, out, index, encoder, show_progress=show_progress)
    index["complete"] = True
    write_index(out, index)
    summary = _summary(out, index, written=written, reused=reused)
    logger.info("token cache %s: %d items, skipped %s", out, summary.num_items, summary.skipped)
    return summary


def _header(dataset: torch.utils.data.Dataset, encoder: _ShardEncoder, *, source: Mapping[str, Any] | None,
            tokenizer_name: str, shard_size: int) -> dict:
    """The fingerprint of every input that decides the cache's contents (see the module docstring)."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        # As JSON stores it (tuples become lists, paths strings), so a resume compares like with like.
        "source": _as_json(source),
        "num_items": dataset_length(dataset),
        "layout": encoder.layout.to_dict(),
        "tokenizer": tokenizer_name,
        "tokenizer_sha256": _tokenizer_sha256(encoder.tokenizer),
        "vqgan": encoder.vqgan.config.to_dict(),
        "vqgan_sha256": state_sha256(encoder.vqgan),
        "image_size": encoder.image_size,
        "resize": encoder.resize,
        "shard_size": shard_size,
    }
    if hasattr(dataset, "fingerprint"):  # only sources that have one, so other caches keep their bytes
        header[FINGERPRINT] = _as_json(dataset.fingerprint)
    return header


def _as_json(value: Mapping[str, Any] | None) -> dict | None:
    return None if value is None else json.loads(json.dumps(dict(value), default=str))


def _open_index(out: Path, header: dict, *, overwrite: bool) -> dict:
    """The index to continue: the existing one if it was built from the same inputs, else a new one
    (after clearing old shards when `overwrite`)."""
    index = None if overwrite else read_index(out)
    if index is not None:
        _check_same_inputs(out, index, header)
        return index
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty and holds no token cache; pass overwrite=True")
    if out.is_dir():
        for p in out.glob("shard_*.safetensors"):
            p.unlink()
    index = {**header, "shards": [], "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    write_index(out, index)
    return index


def _check_resumable(out: Path, index: dict, dataset: torch.utils.data.Dataset) -> None:
    """Refuse to resume a streamed dataset nothing identifies; warn where only the length does."""
    if index["num_items"] is None and index.get(FINGERPRINT) is None:
        raise ValueError(f"{out} holds part of a token cache of a streamed dataset without a fingerprint, so "
                         "nothing says the stream is the same data; rebuild it with overwrite=True "
                         "(`medim cache --overwrite`)")
    if index["source"] is None and index.get(FINGERPRINT) is None:
        logger.warning("resuming %s: its data source was not recorded (source=None), so only the dataset's "
                       "length (%d items) says it is the same data", out, len(dataset))


def _write_shards(dataset: torch.utils.data.Dataset, out: Path, index: dict, encoder: _ShardEncoder, *,
                  show_progress: bool) -> int:
    """Encode the items after the finished shards, one shard at a time, each written atomically and
    then listed in index.json. Returns the number of shards written."""
    start = sum(sh["items_read"] for sh in index["shards"])
    index["index_skipped"] = dict(getattr(dataset, "skipped", {}))  # dropped while indexing
    loaders = item_loaders(dataset, start)
    bar = tqdm(total=index["num_items"], initial=start, desc="caching", unit="item", disable=not show_progress)
    written = 0
    while rows := list(itertools.islice(loaders, index["shard_size"])):
        tensors, ids, skipped = encoder.encode(rows)
        append_shard(out, index, tensors, ids, items_read=len(rows), skipped=skipped)
        written += 1
        bar.update(len(rows))
    bar.close()
    return written


def append_shard(out: Path, index: dict, tensors: dict[str, torch.Tensor], ids: list[str], *, items_read: int,
                 skipped: dict) -> None:
    """Write the next shard of the cache in `out` atomically, then list it in index.json: only then is
    it part of the cache (a kill in between leaves the cache as it was)."""
    name = f"shard_{len(index['shards']):05d}.safetensors"
    if ids:
        with atomic_file(out / name, mode="wb") as f:
            f.write(save(tensors, metadata={"ids": json.dumps(ids)}))
    index["shards"].append({"file": name if ids else None, "num_items": len(ids), "items_read": items_read,
                            "skipped": skipped})
    write_index(out, index)


def _check_same_inputs(out: Path, index: dict, header: dict) -> None:
    """Refuse to continue a cache built from other inputs, listing what differs."""
    advice = "Rebuild it with overwrite=True (`medim cache --overwrite`) or choose another output folder."
    if index.get("version") != VERSION:
        raise ValueError(f"{out} holds a token cache of format version {index.get('version')}, which records no "
                         f"fingerprint of its inputs (this medim writes version {VERSION}). {advice}")
    keys = [k for k in header if k not in INFO_KEYS] + ([FINGERPRINT] if FINGERPRINT in index.keys() - header else [])
    differs = _differences({k: index.get(k) for k in keys}, {k: header.get(k) for k in keys})
    if differs:
        raise ValueError(f"{out} holds a token cache built from other inputs; continuing would mix them:\n  "
                         + "\n  ".join(differs) + f"\n{advice}")


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


@dataclass
class _ShardEncoder:
    """Encodes the items of one shard: images by the VQGAN in batches of `batch_size`, reports by the
    tokenizer for the layout, with the first-sentence lengths and original sizes."""

    vqgan: torch.nn.Module
    tokenizer: Any
    layout: SequenceLayout
    image_size: int
    resize: str
    batch_size: int

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int16 if self.vqgan.num_codes <= 2**15 else torch.int32

    def encode(self, rows: list[tuple[int, Callable[[], dict]]]) -> tuple[dict[str, torch.Tensor], list[str], dict]:
        """(tensors, ids, skipped reasons) for the usable items among `rows` (index, load)."""
        parts: dict[str, list[torch.Tensor]] = {"image_codes": [], "text_ids": [], "sizes": [], "prefix_len": []}
        ids: list[str] = []
        skipped: Counter = Counter()
        pending: list[tuple[dict, torch.Tensor, tuple[int, int]]] = []
        for i, load in rows:
            try:
                item = load()
                pixels, size = preprocess([item["image"]], size=self.image_size, resize=self.resize, return_sizes=True)
            except PairLoadError as e:
                logger.warning("skipping item %d: %s", i, e)
                skipped[e.reason] += 1
                continue
            except (OSError, ValueError, TypeError) as e:
                logger.warning("skipping item %d: cannot preprocess its image: %s", i, e)
                skipped["bad_image"] += 1
                continue
            pending.append((item, pixels, size[0]))
            if len(pending) == self.batch_size:
                self._flush(pending, parts, ids)
        if pending:
            self._flush(pending, parts, ids)
        if not ids:
            return {}, [], dict(skipped)
        return {k: torch.cat(v) for k, v in parts.items()}, ids, dict(skipped)

    def _flush(self, pending: list, parts: dict[str, list[torch.Tensor]], ids: list[str]) -> None:
        pixels = torch.cat([p for _, p, _ in pending]).to(self.vqgan.device, self.vqgan.dtype)
        parts["image_codes"].append(self.vqgan.encode(pixels).cpu().to(self.code_dtype))
        reports = [it["report"] for it, _, _ in pending]
        parts["text_ids"].append(self.layout.encode_reports(self.tokenizer, reports).to(torch.int32))
        parts["prefix_len"].append(first_sentence_length(self.layout, self.tokenizer, reports))
        parts["sizes"].append(torch.tensor([list(sz) for _, _, sz in pending], dtype=torch.int32))
        ids.extend(str(it["id"]) for it, _, _ in pending)
        pending.clear()


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
        index = read_index(self.path)
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

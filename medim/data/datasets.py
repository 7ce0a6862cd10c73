"""Paired image-report datasets.

Every source is indexed into `PairedRecord`s (id, image path, report, metadata); reports are read
while indexing, so records with a missing or empty report, or a missing image file, are dropped
then and counted in `dataset.skipped`. Images are opened only when an item is read: a torch
`Dataset` item is `{"id", "image" (PIL, as loaded, any mode), "report", "meta"}`. `iter_pairs`
walks a dataset, skips images that cannot be decoded, counts them and logs a summary, so one bad
file never stops an epoch.

Sources (by `build_dataset` kind):
- "folder": `x.png|jpg|jpeg|dcm|dicom` beside `x.txt`, searched recursively.
- "jsonl": one `{"image": path relative to the manifest, "report": text, ...}` per line.
- "pathgen": PathGen-1.6M records (json / jsonl / csv, e.g. MeDiM's csv split files) joined with
  the user's extracted patches (`medim.data.pathgen`).
- "mimic-cxr": the MIMIC-CXR-JPG tree + the study reports + the official split csv
  (`medim.data.mimic_cxr`).
- "phantom": synthetic phantom pairs (`medim.data.synthetic`), generated on the fly; `variant`
  picks an opt-in variant (e.g. "effusion").
- "hf": a Hugging Face `datasets` dataset: Hub id, `save_to_disk` folder or data files, optionally
  streamed, with a column mapping (`medim.data.hf_dataset`; needs `pip install 'medim-diffusion[hf]'`).

A streamed source is a torch `IterableDataset` without a length; `item_loaders` reads either kind
in order, from any item on (how `iter_pairs` and the token cache walk a dataset).

Example:
    >>> from medim.data.datasets import build_dataset, iter_pairs
    >>> ds = build_dataset("phantom", n=4, seed=0)
    >>> [item["id"] for item in iter_pairs(ds)]
    ['phantom-0-0', 'phantom-0-1', 'phantom-0-2', 'phantom-0-3']
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from medim.data.hf_dataset import load_hf_dataset
from medim.data.images import DICOM_SUFFIXES, read_image_file
from medim.data.mimic_cxr import MIMIC_CXR_PREFIX, extract_sections, mimic_cxr_records
from medim.data.pathgen import pathgen_records
from medim.data.records import IMAGE_SUFFIXES, PairedRecord, PairLoadError, clean_text, existing_dir
from medim.data.synthetic import make_pair
from medim.utils.checks import check_choice, check_int

__all__ = [
    "IMAGE_SUFFIXES",
    "MIMIC_CXR_PREFIX",
    "PairedRecord",
    "PairLoadError",
    "PairedDataset",
    "PhantomDataset",
    "iter_pairs",
    "item_loaders",
    "dataset_length",
    "extract_sections",
    "build_dataset",
    "DATASET_KINDS",
]

logger = logging.getLogger(__name__)


def _load_image(path: Path) -> Image.Image:
    try:  # decoded now (DICOM too): a truncated or corrupt file fails here, not later
        return read_image_file(path, lambda image: image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PairLoadError(f"cannot read image: {e}", "unreadable_image", path) from e


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; a line that is not JSON
    raises ValueError naming the file and line."""
    lineno = 0
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 after line {lineno} ({e.reason}); save it as UTF-8") from None


class PairedDataset(torch.utils.data.Dataset):
    """Image-report pairs from a list of `PairedRecord`s.

    `dataset[i]` returns `{"id", "image", "report", "meta"}` and raises `PairLoadError` for an
    image that cannot be decoded; `iter_pairs(dataset)` skips and counts those instead.
    `skipped` counts the records dropped while indexing (reason -> count).

    Example:
        >>> ds = PairedDataset.from_folder("data/pairs")  # doctest: +SKIP
        >>> item = ds[0]; item["image"].size, item["report"]  # doctest: +SKIP
    """

    def __init__(self, records: Iterable[PairedRecord], skipped: Counter | None = None):
        self.records = list(records)
        self.skipped = Counter(skipped or {})

    def __len__(self) -> int:
        return len(self.records)

    @property
    def fingerprint(self) -> dict[str, str]:
        """What a token cache records to refuse resuming on other data (`medim.data.cache`): sha256
        over every record's id, report and image file size. Sizes, not contents: one stat per image
        rather than a second read of the dataset (an image replaced by one of exactly its size
        passes)."""
        digest = hashlib.sha256()
        for record in self.records:
            size = record.image_path.stat().st_size if record.image_path.is_file() else None
            digest.update(json.dumps([record.id, record.report, size]).encode() + b"\n")
        return {"records": digest.hexdigest()}

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {
            "id": record.id,
            "image": _load_image(record.image_path),
            "report": record.report,
            "meta": dict(record.meta),
        }

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> PairedDataset:
        """Every `x.png|jpg|jpeg|dcm|dicom` under `root` (recursively) paired with `x.txt` beside it."""
        root = existing_dir(root, "root")
        records, skipped = [], Counter()
        suffixes = IMAGE_SUFFIXES + DICOM_SUFFIXES
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()):
            report = _read_report(path.with_suffix(".txt"), skipped)
            if report:
                rel = path.relative_to(root).as_posix()
                records.append(PairedRecord(rel, path, report, {"source": "folder", "path": rel}))
        return cls._indexed(records, skipped, f"folder {root}")

    @classmethod
    def from_jsonl(cls, manifest: str | os.PathLike) -> PairedDataset:
        """A JSONL manifest: `{"image": path, "report": text, ...}` per line.

        Relative image paths are relative to the manifest's folder. An optional "id" names the
        record (default: the image path as written); all other keys go into `meta`.
        """
        manifest = Path(manifest).expanduser()
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest} does not exist")
        records, skipped = [], Counter()
        for lineno, row in iter_jsonl(manifest):
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError(f'{manifest}:{lineno}: each line must be an object with an "image" path')
            report = row.get("report")
            if not isinstance(report, str) or not report.strip():
                skipped["empty_report"] += 1
                continue
            image = manifest.parent / row["image"]
            if not image.is_file():
                skipped["missing_image"] += 1
                continue
            meta = {
                "source": "jsonl",
                **{k: v for k, v in row.items() if k not in ("image", "report", "id")},
            }
            records.append(PairedRecord(str(row.get("id", row["image"])), image, clean_text(report), meta))
        return cls._indexed(records, skipped, f"manifest {manifest}")

    @classmethod
    def from_pathgen(
        cls,
        records: str | os.PathLike,
        patch_dir: str | os.PathLike,
        *,
        filename: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> PairedDataset:
        """PathGen-1.6M records joined with the patches extracted from the TCGA slides.

        `records` is a json (list of objects), jsonl or csv file, or a Hub *dataset* repo id with
        `filename` (e.g. MeDiM's split files `pathgen_train.csv` / `pathgen_test_*.csv`). Field
        names are matched case-insensitively: `wsi_id`, `position` ([x, y], "[x, y]" or "x_y"),
        `caption` (or `report`/`text`), optional `file_id`. Rows without `wsi_id` may name the patch
        directly in `image`/`file_name`/`filename`/`image_path`.

        Patch naming (PathGen's extraction script): `{wsi_id}_{x}_{y}.png` (any image suffix,
        anywhere under `patch_dir`, e.g. in per-slide folders); `{file_id}_{x}_{y}` is also tried.
        The record's caption is the report; records without a patch are counted as missing_image.
        """
        found, skipped = pathgen_records(records, patch_dir, filename=filename, revision=revision,
                                         cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        return cls._indexed(found, skipped, f"PathGen records {records}" + (f" ({filename})" if filename else ""))

    @classmethod
    def from_mimic_cxr(
        cls,
        jpg_root: str | os.PathLike,
        reports_root: str | os.PathLike | None = None,
        *,
        split_csv: str | os.PathLike | None = None,
        split: str | None = "train",
        sections: tuple[str, ...] = ("findings", "impression"),
        prefix: bool | str = False,
        metadata_csv: str | os.PathLike | None = None,
        views: tuple[str, ...] | None = None,
        progress: bool = False,
    ) -> PairedDataset:
        """MIMIC-CXR-JPG images with their study reports.

        - `jpg_root`: the MIMIC-CXR-JPG folder holding `files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg`
          (or that `files` folder itself). `reports_root`: the mimic-cxr-reports folder holding
          `files/p<NN>/p<subject_id>/s<study_id>.txt` (default: `jpg_root`).
        - `split_csv`: `mimic-cxr-2.0.0-split.csv(.gz)` (columns dicom_id, study_id, subject_id,
          split); with it only images of `split` ("train", "validate", "test"; None = all listed)
          are used. Without it every jpg under `files/` is used and `split` must be None.
        - `sections`: the report sections kept, in this order (FINDINGS / IMPRESSION by default);
          a study with none of them is skipped as an empty report.
        - `prefix`: True puts MeDiM's MIMIC-CXR prefix before each report (a str: that prefix).
        - `metadata_csv` + `views`: keep only these ViewPosition values (e.g. ("PA", "AP")) from
          `mimic-cxr-2.0.0-metadata.csv(.gz)`.
        """
        records, skipped = mimic_cxr_records(
            jpg_root, reports_root, split_csv=split_csv, split=split, sections=sections, prefix=prefix,
            metadata_csv=metadata_csv, views=views, progress=progress,
        )
        return cls._indexed(records, skipped, f"MIMIC-CXR {jpg_root}")

    @classmethod
    def _indexed(cls, records: list[PairedRecord], skipped: Counter, what: str) -> PairedDataset:
        summary = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        logger.info("indexed %d pairs from %s (skipped: %s)", len(records), what, summary)
        return cls(records, skipped)


class PhantomDataset(torch.utils.data.Dataset):
    """`n` synthetic phantom pairs (`medim.data.synthetic`), generated on demand.

    Item `i` is `make_pair(numpy.random.default_rng([seed, i]), size, variant=variant)`, identical
    to `make_dataset(n, seed, size, variant=variant)[i]`; `meta["spec"]` holds its true attributes.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64, variant: str | None = None):
        check_int(n, "n", minimum=0)
        check_int(seed, "seed", minimum=0)
        make_pair(0, size, variant=variant)  # validates size and variant before any item is requested
        self.n, self.seed, self.size, self.variant = n, seed, size, variant
        self.skipped = Counter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} phantom pairs")
        index %= self.n
        image, report, spec = make_pair(np.random.default_rng([self.seed, index]), self.size, variant=self.variant)
        meta = {"source": "phantom", "seed": self.seed, "index": index, "spec": spec.to_dict()}
        name = "phantom" if self.variant is None else f"phantom-{self.variant}"
        if self.variant is not None:
            meta["variant"] = self.variant
        return {"id": f"{name}-{self.seed}-{index}", "image": image, "report": report, "meta": meta}


def dataset_length(dataset: torch.utils.data.Dataset) -> int | None:
    """The number of items, or None for a streamed (iterable) dataset."""
    return None if isinstance(dataset, torch.utils.data.IterableDataset) else len(dataset)


def item_loaders(dataset: torch.utils.data.Dataset, start: int = 0) -> Iterator[tuple[int, Callable[[], dict]]]:
    """`(index, load)` for each item from `start` on, in order; `load()` returns the item or raises
    `PairLoadError`. Indexable datasets are read with `dataset[i]`; a streamed one through its own
    `item_loaders` (e.g. `HFStreamingPairs`), or else by iterating it and passing over the first
    `start` items."""
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        for index in range(start, len(dataset)):
            yield index, partial(dataset.__getitem__, index)
    elif hasattr(dataset, "item_loaders"):
        yield from dataset.item_loaders(start)
    else:
        for index, item in enumerate(dataset):
            if index >= start:
                yield index, partial(dict, item)


def iter_pairs(
    dataset: torch.utils.data.Dataset,
    stats: Counter | None = None,
    *,
    indices: Iterable[int] | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield the usable items of `dataset`, skipping (and counting) the ones that fail to load.

    `indices` picks the items to read, in order (default: all; e.g. `range(rank, len(ds), world)`
    for one shard; not for a streamed dataset). `stats`, if given, is updated as items are read:
    "yielded" and one count per skip reason, starting with the dataset's index-time `skipped`
    counts. A summary is logged at the end.

    Example:
        >>> stats = Counter()
        >>> items = list(iter_pairs(build_dataset("phantom", n=3), stats))
        >>> stats["yielded"]
        3
    """
    counts = stats if stats is not None else Counter()
    counts.update(getattr(dataset, "skipped", {}))
    if indices is None:
        loaders, total = item_loaders(dataset), dataset_length(dataset)
    elif dataset_length(dataset) is None:
        raise ValueError("indices: a streamed dataset is read in order; leave indices unset")
    else:
        indices = list(indices)
        loaders, total = ((index, partial(dataset.__getitem__, index)) for index in indices), len(indices)
    for index, load in tqdm(loaders, total=total, desc="reading pairs", disable=not progress):
        try:
            item = load()
        except PairLoadError as e:
            logger.warning("skipping item %d: %s", index, e)
            counts[e.reason] += 1
            continue
        counts["yielded"] += 1
        yield item
    skips = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "yielded") or "none"
    logger.info("read %d pairs (skipped: %s)", counts["yielded"], skips)


def _read_report(path: Path, skipped: Counter) -> str:
    if not path.is_file():
        skipped["missing_report"] += 1
        return ""
    report = clean_text(path.read_text(encoding="utf-8", errors="replace"))
    if not report:
        skipped["empty_report"] += 1
    return report


DATASET_KINDS = {
    "folder": PairedDataset.from_folder,
    "jsonl": PairedDataset.from_jsonl,
    "pathgen": PairedDataset.from_pathgen,
    "mimic-cxr": PairedDataset.from_mimic_cxr,
    "phantom": PhantomDataset,
    "hf": load_hf_dataset,
}


def build_dataset(kind: str, **kwargs) -> torch.utils.data.Dataset:
    """Build a paired dataset by name; `kwargs` go to the source's constructor.

    Kinds: "folder" (root), "jsonl" (manifest), "pathgen" (records, patch_dir, ...),
    "mimic-cxr" (jpg_root, reports_root, split_csv, split, sections, prefix, ...),
    "phantom" (n, seed, size, variant), "hf" (path, split, data_files, streaming, image_column,
    report_column or report_template, ...: `medim.data.hf_dataset.load_hf_dataset`).

    Example:
        >>> ds = build_dataset("phantom", n=2, seed=3, size=64)
        >>> ds[0]["image"].size
        (64, 64)
    """
    check_choice(kind, "kind", sorted(DATASET_KINDS))
    factory = DATASET_KINDS[kind]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"build_dataset({kind!r}) got unknown arguments {unknown}; accepted: {sorted(params)}"
        )
    return factory(**kwargs)

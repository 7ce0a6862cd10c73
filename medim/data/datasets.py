"""Paired image-report datasets.

Every source is indexed into `PairedRecord`s (id, image path, report, metadata); reports are read
while indexing, so records with a missing or empty report, or a missing image file, are dropped
then and counted in `dataset.skipped`. Images are opened only when an item is read: a torch
`Dataset` item is `{"id", "image" (PIL, as loaded, any mode), "report", "meta"}`. `iter_pairs`
walks a dataset, skips images that cannot be decoded, counts them and logs a summary, so one bad
file never stops an epoch.

Sources (by `build_dataset` kind):
- "folder": `x.png|jpg|jpeg` beside `x.txt`, searched recursively.
- "jsonl": one `{"image": path relative to the manifest, "report": text, ...}` per line.
- "pathgen": PathGen-1.6M records (json / jsonl / csv, e.g. MeDiM's csv split files) joined with
  the user's extracted patches.
- "mimic-cxr": the MIMIC-CXR-JPG tree + the study reports + the official split csv.
- "phantom": synthetic phantom pairs (`medim.data.synthetic`), generated on the fly.

Example:
    >>> from medim.data.datasets import build_dataset, iter_pairs
    >>> ds = build_dataset("phantom", n=4, seed=0)
    >>> [item["id"] for item in iter_pairs(ds)]
    ['phantom-0-0', 'phantom-0-1', 'phantom-0-2', 'phantom-0-3']
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from medim.data.synthetic import make_pair
from medim.hub import resolve_file

__all__ = [
    "IMAGE_SUFFIXES",
    "MIMIC_CXR_PREFIX",
    "PairedRecord",
    "PairLoadError",
    "PairedDataset",
    "PhantomDataset",
    "iter_pairs",
    "extract_sections",
    "build_dataset",
    "DATASET_KINDS",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The prefix MeDiM's released training code put before every MIMIC-CXR report.
MIMIC_CXR_PREFIX = "The image is a radiograph of the chest, showing the thoracic cavity structures. "
MIMIC_CXR_SPLITS = ("train", "validate", "test")


@dataclass(frozen=True)
class PairedRecord:
    """One indexed pair: `image_path` is read lazily; `meta` is JSON-friendly source information."""

    id: str
    image_path: Path
    report: str
    meta: dict = field(default_factory=dict)


class PairLoadError(Exception):
    """An item that cannot be used (e.g. an image that does not decode); `reason` names why."""

    def __init__(self, message: str, reason: str, path: Path | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = path


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PairLoadError(f"cannot read image {path}: {e}", "unreadable_image", path) from e


def _clean(text: str) -> str:
    return " ".join(text.split())


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; a line that is not JSON
    raises ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


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
        """Every `x.png|jpg|jpeg` under `root` (recursively) paired with `x.txt` beside it."""
        root = _existing_dir(root, "root")
        records, skipped = [], Counter()
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
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
            records.append(PairedRecord(str(row.get("id", row["image"])), image, _clean(report), meta))
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
        path = resolve_file(
            records,
            filename,
            repo_type="dataset",
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        patches = _index_images(_existing_dir(patch_dir, "patch_dir"))
        out, skipped, seen = [], Counter(), set()
        for n, row in enumerate(_read_rows(path), 1):
            row = {str(k).strip().lower(): v for k, v in row.items()}
            caption = next((row[k] for k in ("caption", "report", "text") if isinstance(row.get(k), str)), "")
            names, meta = _pathgen_names(row, f"{path}: record {n}")
            if not caption.strip():
                skipped["empty_report"] += 1
                continue
            image = next((patches[name] for name in names if name in patches), None)
            if image is None:
                skipped["missing_image"] += 1
                continue
            if names[0] in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(names[0])
            out.append(PairedRecord(names[0], image, _clean(caption), {"source": "pathgen", **meta}))
        return cls._indexed(out, skipped, f"PathGen records {path}")

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
        files = _files_dir(jpg_root, "jpg_root")
        report_files = _files_dir(reports_root, "reports_root") if reports_root is not None else files
        if split in ("val", "valid", "validation"):
            split = "validate"
        if split is not None and split not in MIMIC_CXR_SPLITS:
            raise ValueError(f"split must be one of {list(MIMIC_CXR_SPLITS)} or None, got {split!r}")
        if split is not None and split_csv is None:
            raise ValueError(
                f"split={split!r} needs split_csv (mimic-cxr-2.0.0-split.csv.gz); pass split=None to use every image"
            )
        if not sections or any(s.lower() not in ("findings", "impression") for s in sections):
            raise ValueError(
                f"sections must be a non-empty tuple of 'findings'/'impression', got {sections!r}"
            )
        if (views is None) != (metadata_csv is None):
            raise ValueError(
                "metadata_csv and views must be given together (views: ViewPosition values, e.g. ('PA', 'AP'))"
            )
        text_prefix = MIMIC_CXR_PREFIX if prefix is True else (prefix or "")
        if not isinstance(text_prefix, str):
            raise TypeError(f"prefix must be a bool or a str, got {type(prefix).__name__}")

        if split_csv is not None:
            rows = _read_csv(Path(split_csv), ("dicom_id", "study_id", "subject_id", "split"))
            entries = [
                (r["subject_id"], r["study_id"], r["dicom_id"], r["split"])
                for r in rows
                if split in (None, r["split"])
            ]
        else:
            entries = [
                (p.parent.parent.name[1:], p.parent.name[1:], p.stem, None)
                for p in sorted(files.glob("p*/p*/s*/*.jpg"))
            ]
        view_of = None
        if metadata_csv is not None:
            view_of = {
                r["dicom_id"]: r["ViewPosition"]
                for r in _read_csv(Path(metadata_csv), ("dicom_id", "ViewPosition"))
            }
        records, skipped, reports = [], Counter(), {}
        for subject, study, dicom, row_split in tqdm(
            entries, desc="indexing MIMIC-CXR", disable=not progress
        ):
            if view_of is not None and view_of.get(dicom) not in views:
                skipped["other_view"] += 1
                continue
            study_dir = f"p{subject[:2]}/p{subject}/s{study}"
            image = files / study_dir / f"{dicom}.jpg"
            if not image.is_file():
                skipped["missing_image"] += 1
                continue
            if study_dir not in reports:
                report_path = report_files / f"{study_dir}.txt"
                if report_path.is_file():
                    text = extract_sections(
                        report_path.read_text(encoding="utf-8", errors="replace"), sections
                    )
                    reports[study_dir] = text
                else:
                    reports[study_dir] = None
            report = reports[study_dir]
            if not report:
                skipped["missing_report" if report is None else "empty_report"] += 1
                continue
            meta = {"source": "mimic-cxr", "subject_id": subject, "study_id": study, "dicom_id": dicom}
            if row_split is not None:
                meta["split"] = row_split
            if view_of is not None:
                meta["view"] = view_of[dicom]
            records.append(PairedRecord(dicom, image, text_prefix + report, meta))
        return cls._indexed(records, skipped, f"MIMIC-CXR {files}")

    @classmethod
    def _indexed(cls, records: list[PairedRecord], skipped: Counter, what: str) -> PairedDataset:
        summary = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        logger.info("indexed %d pairs from %s (skipped: %s)", len(records), what, summary)
        return cls(records, skipped)


class PhantomDataset(torch.utils.data.Dataset):
    """`n` synthetic phantom pairs (`medim.data.synthetic`), generated on demand.

    Item `i` is `make_pair(numpy.random.default_rng([seed, i]), size)`, identical to
    `make_dataset(n, seed, size)[i]`; `meta["spec"]` holds its true attributes.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 64):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        make_pair(0, size)  # validates size before any item is requested
        self.n, self.seed, self.size = n, seed, size
        self.skipped = Counter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} phantom pairs")
        index %= self.n
        image, report, spec = make_pair(np.random.default_rng([self.seed, index]), self.size)
        meta = {"source": "phantom", "seed": self.seed, "index": index, "spec": spec.to_dict()}
        return {"id": f"phantom-{self.seed}-{index}", "image": image, "report": report, "meta": meta}


def iter_pairs(
    dataset: torch.utils.data.Dataset,
    stats: Counter | None = None,
    *,
    indices: Iterable[int] | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Yield the usable items of `dataset`, skipping (and counting) the ones that fail to load.

    `indices` picks the items to read, in order (default: all; e.g. `range(rank, len(ds), world)`
    for one shard). `stats`, if given, is updated as items are read: "yielded" and one count per
    skip reason, starting with the dataset's index-time `skipped` counts. A summary is logged at
    the end.

    Example:
        >>> stats = Counter()
        >>> items = list(iter_pairs(build_dataset("phantom", n=3), stats))
        >>> stats["yielded"]
        3
    """
    counts = stats if stats is not None else Counter()
    counts.update(getattr(dataset, "skipped", {}))
    indices = range(len(dataset)) if indices is None else list(indices)
    for index in tqdm(indices, desc="reading pairs", disable=not progress):
        try:
            item = dataset[index]
        except PairLoadError as e:
            logger.warning("skipping item %d: %s", index, e)
            counts[e.reason] += 1
            continue
        counts["yielded"] += 1
        yield item
    skips = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "yielded") or "none"
    logger.info("read %d pairs (skipped: %s)", counts["yielded"], skips)


_SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)]):", re.MULTILINE)


def extract_sections(text: str, sections: tuple[str, ...] = ("findings", "impression")) -> str:
    """The text of the named sections of a MIMIC-CXR report, in the given order, whitespace
    collapsed ("" if none is present). Headers are upper-case words ending in ':' at a line start."""
    headers = list(_SECTION_HEADER.finditer(text))
    found: dict[str, str] = {}
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        name = header.group(1).strip().lower()
        if name not in found:
            found[name] = _clean(text[header.end() : end])
    return " ".join(found[s.lower()] for s in sections if found.get(s.lower()))


def _existing_dir(path: str | os.PathLike, name: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name} {path} is not a directory")
    return path


def _files_dir(root: str | os.PathLike, name: str) -> Path:
    root = _existing_dir(root, name)
    return root / "files" if (root / "files").is_dir() else root


def _read_report(path: Path, skipped: Counter) -> str:
    if not path.is_file():
        skipped["missing_report"] += 1
        return ""
    report = _clean(path.read_text(encoding="utf-8", errors="replace"))
    if not report:
        skipped["empty_report"] += 1
    return report


def _index_images(root: Path) -> dict[str, Path]:
    """Image stem -> path for every image under `root` (the first in sorted order wins)."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(path.stem, path)
    return index


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return list(reader)


def _read_rows(path: Path) -> list[dict]:
    """Rows of a json (a list of objects), jsonl or csv(.gz) file."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return _read_csv(path, ())
    with _open_text(path) as f:
        if name.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif name.endswith(".json"):
            rows = json.load(f)
        else:
            raise ValueError(f"records must be a .json, .jsonl or .csv file, got {path.name}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of objects")
    return rows


def _position(value: object, where: str) -> tuple[str, str]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        x, y = value
    else:
        parts = re.findall(r"-?\d+", str(value))
        if len(parts) != 2:
            raise ValueError(f"{where}: position must be [x, y], got {value!r}")
        x, y = parts
    return str(int(x)), str(int(y))


def _pathgen_names(row: dict, where: str) -> tuple[list[str], dict]:
    """Candidate patch stems (the first is the record id) and metadata of one PathGen row."""
    if row.get("wsi_id"):
        x, y = _position(row.get("position"), where)
        wsi = str(row["wsi_id"]).strip()
        names = [f"{wsi}_{x}_{y}"]
        meta = {"wsi_id": wsi, "position": [int(x), int(y)]}
        if row.get("file_id"):
            meta["file_id"] = str(row["file_id"]).strip()
            names.append(f"{meta['file_id']}_{x}_{y}")
        return names, meta
    for key in ("image", "file_name", "filename", "image_path"):
        if row.get(key):
            stem = Path(str(row[key]).strip()).stem
            return [stem], {"image": str(row[key]).strip()}
    raise ValueError(f"{where}: needs wsi_id + position, or an image/file_name column (has {sorted(row)})")


DATASET_KINDS = {
    "folder": PairedDataset.from_folder,
    "jsonl": PairedDataset.from_jsonl,
    "pathgen": PairedDataset.from_pathgen,
    "mimic-cxr": PairedDataset.from_mimic_cxr,
    "phantom": PhantomDataset,
}


def build_dataset(kind: str, **kwargs) -> PairedDataset | PhantomDataset:
    """Build a paired dataset by name; `kwargs` go to the source's constructor.

    Kinds: "folder" (root), "jsonl" (manifest), "pathgen" (records, patch_dir, ...),
    "mimic-cxr" (jpg_root, reports_root, split_csv, split, sections, prefix, ...),
    "phantom" (n, seed, size).

    Example:
        >>> ds = build_dataset("phantom", n=2, seed=3, size=64)
        >>> ds[0]["image"].size
        (64, 64)
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind must be one of {sorted(DATASET_KINDS)}, got {kind!r}")
    factory = DATASET_KINDS[kind]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"build_dataset({kind!r}) got unknown arguments {unknown}; accepted: {sorted(params)}"
        )
    return factory(**kwargs)

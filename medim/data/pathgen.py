"""PathGen-1.6M: its caption records (json / jsonl / csv, local or on the Hub) joined with the patches
the user extracted from the TCGA slides."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from medim.data.records import IMAGE_SUFFIXES, PairedRecord, clean_text, existing_dir, open_text, read_csv
from medim.utils.hub import HubOptions, resolve_file

__all__ = ["pathgen_records"]


def pathgen_records(
    records: str | os.PathLike,
    patch_dir: str | os.PathLike,
    *,
    filename: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> tuple[list[PairedRecord], Counter]:
    """The records of `PairedDataset.from_pathgen` (see there for the arguments) and the skipped
    counts by reason."""
    path = resolve_file(records, filename, repo_type="dataset",
                        hub=HubOptions(revision, cache_dir, local_files_only, token))
    patches = _index_images(existing_dir(patch_dir, "patch_dir"))
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
        out.append(PairedRecord(names[0], image, clean_text(caption), {"source": "pathgen", **meta}))
    return out, skipped


def _index_images(root: Path) -> dict[str, Path]:
    """Image stem -> path for every image under `root` (the first in sorted order wins)."""
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(path.stem, path)
    return index


def _read_rows(path: Path) -> list[dict]:
    """Rows of a json (a list of objects), jsonl or csv(.gz) file."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return read_csv(path, ())
    with open_text(path) as f:
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

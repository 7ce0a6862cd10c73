"""MIMIC-CXR-JPG: the image tree indexed with its study reports (FINDINGS / IMPRESSION) and split csv."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from medim.data.records import PairedRecord, clean_text, existing_dir, read_csv

__all__ = ["MIMIC_CXR_PREFIX", "MIMIC_CXR_SPLITS", "extract_sections", "mimic_cxr_records"]

# The prefix MeDiM's released training code put before every MIMIC-CXR report.
MIMIC_CXR_PREFIX = "The image is a radiograph of the chest, showing the thoracic cavity structures. "
MIMIC_CXR_SPLITS = ("train", "validate", "test")

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
            found[name] = clean_text(text[header.end() : end])
    return " ".join(found[s.lower()] for s in sections if found.get(s.lower()))


def _files_dir(root: str | os.PathLike, name: str) -> Path:
    root = existing_dir(root, name)
    return root / "files" if (root / "files").is_dir() else root


def mimic_cxr_records(
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
) -> tuple[list[PairedRecord], Counter]:
    """The records of `PairedDataset.from_mimic_cxr` (see there for the arguments) and the skipped
    counts by reason. Every argument is checked before any file is read."""
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
        raise ValueError(f"sections must be a non-empty tuple of 'findings'/'impression', got {sections!r}")
    if (views is None) != (metadata_csv is None):
        raise ValueError(
            "metadata_csv and views must be given together (views: ViewPosition values, e.g. ('PA', 'AP'))"
        )
    text_prefix = MIMIC_CXR_PREFIX if prefix is True else (prefix or "")
    if not isinstance(text_prefix, str):
        raise TypeError(f"prefix must be a bool or a str, got {type(prefix).__name__}")

    if split_csv is not None:
        rows = read_csv(Path(split_csv), ("dicom_id", "study_id", "subject_id", "split"))
        entries = [
            (r["subject_id"], r["study_id"], r["dicom_id"], r["split"]) for r in rows if split in (None, r["split"])
        ]
    else:
        entries = [
            (p.parent.parent.name[1:], p.parent.name[1:], p.stem, None) for p in sorted(files.glob("p*/p*/s*/*.jpg"))
        ]
    view_of = None
    if metadata_csv is not None:
        view_of = {r["dicom_id"]: r["ViewPosition"] for r in read_csv(Path(metadata_csv), ("dicom_id", "ViewPosition"))}
    records, skipped, reports = [], Counter(), {}
    for subject, study, dicom, row_split in tqdm(entries, desc="indexing MIMIC-CXR", disable=not progress):
        if view_of is not None and view_of.get(dicom) not in views:
            skipped["other_view"] += 1
            continue
        study_dir = f"p{subject[:2]}/p{subject}/s{study}"
        image = files / study_dir / f"{dicom}.jpg"
        if not image.is_file():
            skipped["missing_image"] += 1
            continue
        if study_dir not in reports:  # a study's report is read once, for all of its images
            report_path = report_files / f"{study_dir}.txt"
            reports[study_dir] = (
                extract_sections(report_path.read_text(encoding="utf-8", errors="replace"), sections)
                if report_path.is_file()
                else None
            )
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
    return records, skipped

"""The indexed pair (`PairedRecord`), the error of an unusable item, and the file helpers that every
paired source (`datasets`, `mimic_cxr`, `pathgen`) shares; it imports none of them."""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "PairedRecord", "PairLoadError", "clean_text", "existing_dir", "read_csv", "open_text"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def clean_text(text: str) -> str:
    """Whitespace runs (newlines included) collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def existing_dir(path: str | os.PathLike, name: str) -> Path:
    """`path` as a Path; FileNotFoundError naming the argument `name` if it is not a directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name} {path} is not a directory")
    return path


def open_text(path: Path) -> io.TextIOBase:
    """A text file for csv reading, gunzipped on the fly when it ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The rows of a csv(.gz) file as dicts; ValueError naming the `required` columns it lacks."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return list(reader)

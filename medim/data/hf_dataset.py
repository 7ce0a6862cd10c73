"""Image-report pairs from a Hugging Face `datasets` dataset (`build_dataset("hf", ...)`).

The data can be a Hub dataset id, a folder written by `save_to_disk`, or data files read by one of
the `datasets` builders (`path="parquet"`, "json", "csv", "imagefolder", ... with `data_files` or
`data_dir`), loaded whole (`HFPairedDataset`, indexable) or streamed (`HFStreamingPairs`, read in
order). Columns are mapped to a pair by `HFColumns`: the image column holds a decoded `Image`
feature, encoded bytes, a file path or an array; the report is one column or a template over
several (`"FINDINGS: {findings} IMPRESSION: {impression}"`). Images are decoded by
`medim.data.images.load_image` when an item is read, so a bad image or an empty report skips that
item (`PairLoadError`) instead of stopping an epoch; a bad configuration (unknown column, empty
split) fails while loading, before any item is read.

`fingerprint` identifies the data for the token cache: the `save_to_disk` dataset's own fingerprint,
or the builder's config id (a hash of its options and data files: the Hub files at the resolved
commit, local files with their modification times) and the Hub commit, plus the split and the
column mapping.

Example:
    >>> ds = load_hf_dataset("parquet", data_files="train.parquet", report_column="text")  # doctest: +SKIP
    >>> ds[0]["report"]  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medim.data.images import load_image
from medim.data.records import PairLoadError, clean_text
from medim.utils.checks import check_bool

__all__ = ["HFColumns", "HFPairedDataset", "HFStreamingPairs", "load_hf_dataset", "import_datasets"]

# What decoding a stored image can raise (a corrupt file, an unsupported array, a missing path).
_IMAGE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError)


def import_datasets():
    """The `datasets` library, or ImportError naming the extra that installs it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("the 'hf' dataset kind needs the datasets library: pip install 'medim-diffusion[hf]'") from e
    return datasets


def _template_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"report_template {template!r} is not a format string: {e}") from e
    fields = [name for _, name, _, _ in parsed if name is not None]
    bad = [name for name in fields if not name.isidentifier()]
    if bad or not fields:
        raise ValueError(f"report_template must name columns as {{column}} (plain names only), got {template!r}")
    return list(dict.fromkeys(fields))


@dataclass(frozen=True)
class HFColumns:
    """Which columns make a pair: `image_column`; the report from `report_column` or from
    `report_template` (str.format over column names; missing values read as empty); the item id from
    `id_column` (default: the row number)."""

    image_column: str = "image"
    report_column: str | None = None
    report_template: str | None = None
    id_column: str | None = None

    def __post_init__(self):
        for name in ("image_column", "report_column", "report_template", "id_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.report_column is not None and self.report_template is not None:
            raise ValueError("pass report_column or report_template, not both")
        if self.report_column is None and self.report_template is None:
            object.__setattr__(self, "report_column", "report")
        if self.report_template is not None:
            _template_fields(self.report_template)

    def used(self) -> dict[str, list[str]]:
        """The columns each option reads, by option name."""
        report = ({"report_column": [self.report_column]} if self.report_template is None
                  else {"report_template": _template_fields(self.report_template)})
        return {"image_column": [self.image_column], **report,
                **({"id_column": [self.id_column]} if self.id_column else {})}

    def check(self, columns: list[str], what: str) -> None:
        """ValueError naming the option whose column `what` lacks, listing the columns it has."""
        for option, names in self.used().items():
            missing = [n for n in names if n not in columns]
            if missing:
                raise ValueError(f"{option}: {what} has no column {', '.join(map(repr, missing))}; "
                                 f"its columns: {', '.join(columns)}")

    def item(self, row: dict, index: int, dtype: str | None = None) -> dict:
        """The pair `{"id", "image", "report", "meta"}` of one row; PairLoadError if unusable.
        `dtype` is the element type of an image column stored as nested lists."""
        if self.report_template is None:
            report = clean_text(_text(row[self.report_column]))
        else:
            values = {n: _text(row[n]) for n in _template_fields(self.report_template)}
            # A row whose columns are all empty has no report, whatever the template's own words.
            report = clean_text(self.report_template.format(**values)) if any(map(str.strip, values.values())) else ""
        if not report:
            raise PairLoadError(f"row {index}: empty report", "empty_report")
        image = _decode_image(row[self.image_column], f"{self.image_column} of row {index}", dtype)
        item_id = str(row[self.id_column]) if self.id_column else str(index)
        return {"id": item_id, "image": image, "report": report, "meta": {"source": "hf", "index": index}}


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _decode_image(value: Any, what: str, dtype: str | None) -> Image.Image:
    if value is None:
        raise PairLoadError(f"{what}: no image", "missing_image")
    try:
        if isinstance(value, dict):  # an Image feature read undecoded: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as opened:
                opened.load()
                return load_image(opened, what)
        if isinstance(value, list):
            value = np.asarray(value, dtype=dtype)
        return load_image(value, what)
    except _IMAGE_ERRORS as e:
        raise PairLoadError(f"cannot read {what}: {e}", "unreadable_image") from e


def _check_image_feature(feature: Any, column: str) -> None:
    """ValueError naming image_column when its feature cannot hold images (e.g. an int column),
    rather than every item being skipped as unreadable."""
    datasets = import_datasets()
    if isinstance(feature, datasets.Image) or hasattr(feature, "feature") or hasattr(feature, "shape"):
        return  # decoded images, or arrays (Array2D..5D, nested lists)
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string"):
        return  # encoded bytes or file paths
    raise ValueError(f"image_column: column {column!r} holds {feature}, not images (an Image feature, encoded "
                     "bytes, file paths or arrays)")


def _leaf_dtype(feature: Any) -> str | None:
    # Nested lists (Array2D/3D, List of Value) keep their element type in the feature, not in the row.
    while hasattr(feature, "feature"):
        feature = feature.feature
    return getattr(feature, "dtype", None)


def _undecoded(data: Any, column: str) -> Any:
    """`data` with an `Image` column read as bytes/path, so that load_image decodes it and a corrupt
    image becomes a skipped item rather than an error inside `datasets`."""
    datasets = import_datasets()
    if data.features is not None and isinstance(data.features.get(column), datasets.Image):
        return data.cast_column(column, datasets.Image(decode=False))
    return data


class HFPairedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` read as image-report pairs: `dataset[i]` is `{"id", "image" (RGB PIL),
    "report", "meta"}` and raises `PairLoadError` for an unusable row.

    Example:
        >>> data = datasets.load_from_disk("data/cxr")  # doctest: +SKIP
        >>> pairs = HFPairedDataset(data, HFColumns(report_column="text"))  # doctest: +SKIP
    """

    def __init__(self, data: Any, columns: HFColumns | None = None, *, fingerprint: dict | None = None,
                 what: str = "the dataset"):
        self.columns = columns or HFColumns()
        self.columns.check(list(data.column_names), what)
        if len(data) == 0:
            raise ValueError(f"split: {what} holds no rows")
        _check_image_feature(data.features[self.columns.image_column], self.columns.image_column)
        self.dtype = _leaf_dtype(data.features[self.columns.image_column])
        self.data = _undecoded(data, self.columns.image_column)
        self.fingerprint = fingerprint or {"dataset": data._fingerprint, **asdict(self.columns)}
        self.skipped = Counter()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.columns.item(self.data[index], index, self.dtype)


class HFStreamingPairs(torch.utils.data.IterableDataset):
    """A `datasets.IterableDataset` read as image-report pairs, in order, without a length.

    `item_loaders(start)` gives `(row number, load)` from row `start` on, where `load()` returns the
    item or raises `PairLoadError` (how `iter_pairs` and the token cache read it, skipping bad rows);
    iterating yields the items and raises on the first unusable one. `fingerprint` is None when the
    data cannot be identified (a token cache built from it then cannot be resumed).
    """

    def __init__(self, data: Any, columns: HFColumns | None = None, *, fingerprint: dict | None = None,
                 what: str = "the streamed dataset"):
        self.columns = columns or HFColumns()
        if data.features:  # else the columns show in the first row
            self.columns.check(list(data.features), what)
            _check_image_feature(data.features[self.columns.image_column], self.columns.image_column)
        self.dtype = _leaf_dtype(data.features[self.columns.image_column]) if data.features else None
        self.data = _undecoded(data, self.columns.image_column)
        try:
            first = next(iter(self.data))
        except StopIteration:
            raise ValueError(f"split: {what} holds no rows") from None
        self.columns.check(list(first), what)
        self.fingerprint = fingerprint
        self.skipped = Counter()

    def item_loaders(self, start: int = 0) -> Iterator[tuple[int, Callable[[], dict]]]:
        rows = self.data.skip(start) if start else self.data
        for index, row in enumerate(rows, start):
            yield index, partial(self.columns.item, row, index, self.dtype)

    def __iter__(self) -> Iterator[dict]:
        return (load() for _, load in self.item_loaders())


def _from_disk(folder: Path, split: str | None, options: dict) -> tuple[Any, dict]:
    datasets = import_datasets()
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"{', '.join(given)}: not used with a save_to_disk folder ({folder})")
    data = datasets.load_from_disk(str(folder))
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise ValueError(f"split {split!r}: {folder} holds the splits {', '.join(data)}")
        data = data[split]
    elif split is not None:
        raise ValueError(f"split {split!r}: {folder} holds a single dataset, not splits; leave split unset")
    return data, {"dataset": data._fingerprint, "split": split}


def _from_builder(path: str, split: str | None, options: dict, streaming: bool) -> tuple[Any, dict]:
    datasets = import_datasets()
    builder = datasets.load_dataset_builder(path, **options)
    split = split or "train"
    known = list(builder.config.data_files or {})
    if known and split.split("[")[0] not in known:  # before downloading anything
        raise ValueError(f"split {split!r}: {path} has the splits {', '.join(known)}")
    identity = {"config": builder.config_id, "revision": builder.hash if builder.repo_id else None, "split": split}
    if not streaming:
        builder.download_and_prepare()
    try:
        data = builder.as_streaming_dataset(split=split) if streaming else builder.as_dataset(split=split)
    except (ValueError, KeyError) as e:  # an unknown split of a dataset whose splits show only now
        raise ValueError(f"split {split!r}: {e}") from e
    return data, identity


def load_hf_dataset(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    name: str | None = None,
    data_files: str | list | dict | None = None,
    data_dir: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    image_column: str = "image",
    report_column: str | None = None,
    report_template: str | None = None,
    id_column: str | None = None,
) -> HFPairedDataset | HFStreamingPairs:
    """Image-report pairs from a Hugging Face dataset (the `hf` kind of `build_dataset`).

    `path`: a folder written by `save_to_disk` (read with `datasets.load_from_disk`; `split` picks
    one of a DatasetDict's splits, default "train"), or anything `datasets.load_dataset` takes: a
    Hub id (with `name`, `revision`, `token`), a builder name with `data_files` / `data_dir`
    ("parquet", "json", "csv", "imagefolder"), or a local folder of data files. `split` defaults to
    "train" there and may slice (`"train[:1000]"`, not when streaming). `streaming=True` reads the
    rows as they come (an `HFStreamingPairs`, no length). Columns: see `HFColumns`; `report_column`
    defaults to "report" when no `report_template` is given.

    Example:
        >>> ds = load_hf_dataset("data/cxr-saved",  # doctest: +SKIP
        ...                      report_template="FINDINGS: {findings} IMPRESSION: {impression}")
    """
    check_bool(streaming, "streaming")
    if split is not None and (not isinstance(split, str) or not split):
        raise ValueError(f"split must be a non-empty string or None, got {split!r}")
    columns = HFColumns(image_column, report_column, report_template, id_column)
    options = {"name": name, "data_files": data_files, "data_dir": data_dir, "revision": revision}
    folder = Path(path).expanduser()
    if folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
        data, identity = _from_disk(folder, split, options)
        if streaming:
            data = data.to_iterable_dataset()
    else:
        options = {k: v for k, v in options.items() if v is not None}
        data, identity = _from_builder(str(path), split, {**options, "cache_dir": cache_dir, "token": token}, streaming)
    fingerprint = {**identity, **asdict(columns)}
    kind = HFStreamingPairs if streaming else HFPairedDataset
    what = f"{path} (split {identity['split']!r})" if identity["split"] else str(path)
    return kind(data, columns, fingerprint=fingerprint, what=what)

"""The manifest of a `medim generate` folder: the finished samples, one JSON line each, in
`manifest.jsonl` and (while a torchrun job runs) one `manifest.rank<r>.jsonl` part per rank, which
rank 0 merges in index order.

Every line medim writes begins with `{"medim": "generate"` (`SIGNATURE`), and manifest.jsonl's
first line is a header holding the size and sha256 of every input file (`fingerprints`). A folder
is written into only when it is empty or its manifest is medim's: a user's files are never
overwritten, and the cleanup removes only the exact temporary names of medim's atomic writers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from medim.commands.common import SAMPLER_FIELDS
from medim.utils.hub import temporary_names

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
# Every manifest line (header and samples) starts with this: how a folder is known to be medim's.
MARK = {"medim": "generate"}
SIGNATURE = json.dumps(MARK)[:-1]
# Settings that change what a sample looks like: a resumed run must use the same ones.
SETTING_KEYS = ("task", "model", "loader", "revision", "lora", "fuse_lora", *SAMPLER_FIELDS, "image_size", "prompt",
                "dtype", "seed", "num_per_prompt", "mask_dilation")
# What a killed run can leave in the folder: exactly the temporary files of the atomic writers.
LEFTOVER = temporary_names(r"\d{6,}\.(?:png|txt)|manifest(?:\.rank\d+)?\.jsonl")


def is_header(row: object) -> bool:
    """Whether a parsed manifest line is the header (not a sample): readers of the folder skip it."""
    return isinstance(row, dict) and row.get("medim") == MARK["medim"] and "index" not in row


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Where a rank lists the samples it finished: manifest.jsonl itself when it is alone."""
    return out / (MANIFEST if world_size == 1 else f"manifest.rank{rank}.jsonl")


def _lines(path: Path) -> tuple[list[dict], bool]:
    """The JSON lines of one manifest file and whether its last line was cut short by a kill;
    refuses (SystemExit) a file medim did not write."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise SystemExit(f"{path} was not written by medim ({e}); use a new --out") from None
    rows, cut = [], False
    for n, line in enumerate(text.splitlines(keepends=True)):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and row.get("medim") == MARK["medim"]:
            rows.append(row)
        elif not line.endswith("\n") and (line.startswith(SIGNATURE) or SIGNATURE.startswith(line)):
            cut = True  # the last line, cut short by a kill
        else:
            raise SystemExit(f"{path} line {n + 1} was not written by medim generate; it is left as it is: "
                             "use a new --out")
    return rows, cut


def read(out: Path) -> tuple[dict | None, dict[int, dict], bool]:
    """The header, every finished sample's entry by index (from manifest.jsonl and any rank parts),
    and whether manifest.jsonl must be rewritten (parts to merge, a line cut short by a kill, or
    lines out of index order after a resume)."""
    header, entries = None, {}
    parts = sorted(out.glob("manifest.rank*.jsonl"))
    dirty, last = bool(parts), -1
    for path in [out / MANIFEST, *parts]:
        if not path.exists():
            continue
        rows, cut = _lines(path)
        dirty |= cut
        for row in rows:
            if is_header(row):
                header = header or row
                continue
            dirty |= row["index"] <= last  # a duplicate (a merge stopped before removing a part) or out of order
            last = max(last, row["index"])
            entries.setdefault(row["index"], row)
    return header, entries, dirty


def merge(out: Path, header: dict, entries: dict[int, dict]) -> None:
    """Write `header` and `entries` as manifest.jsonl in index order (atomically), then remove the
    rank parts."""
    from medim.utils.hub import atomic_file

    with atomic_file(out / MANIFEST) as f:
        f.writelines(json.dumps(row) + "\n" for row in [header, *(entries[i] for i in sorted(entries))])
    for part in out.glob("manifest.rank*.jsonl"):
        part.unlink()


def source_of(entry: dict):
    """What a sample was made from: its prompt, its source image, or (inpaint) [image, mask, prompt]."""
    if "mask" in entry:
        return [entry.get("source_image"), entry["mask"], entry.get("prompt")]
    return entry.get("source_image", entry.get("prompt"))


def fingerprints(paths: list[str]) -> dict[str, str]:
    """"<size>:<sha256>" of each input file, by resolved path: a resume compares contents, not names."""
    prints = {}
    for path in dict.fromkeys(paths):
        resolved = os.path.realpath(path)
        if resolved not in prints:
            digest = hashlib.sha256()
            with open(resolved, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            prints[resolved] = f"{os.path.getsize(resolved)}:{digest.hexdigest()}"
    return prints


def _normal(source, files: bool):
    """`source` with its input files as resolved paths (`./imgs/a.png` and `imgs/a.png` are one file);
    `files`: whether a plain string source is a file (report) or a prompt (pairs, image)."""
    if isinstance(source, list):  # inpaint: [image, mask, prompt]
        return [*(None if s is None else os.path.realpath(s) for s in source[:2]), *source[2:]]
    return os.path.realpath(source) if files and isinstance(source, str) else source


def _check_folder(out: Path) -> None:
    """Refuse an --out that is not a folder medim can write, or a non-empty folder without a manifest."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"--out: {out} is not writable")
    manifest = out / MANIFEST
    if manifest.is_file():
        with open(manifest, "rb") as f:
            if f.read(len(SIGNATURE)) == SIGNATURE.encode():
                return
        raise SystemExit(f"--out: {manifest} was not written by medim generate; nothing in {out} is overwritten: "
                         "use an empty or new folder")
    if any(not LEFTOVER.fullmatch(p.name) for p in out.iterdir()):
        raise SystemExit(f"--out: {out} is not empty and holds no manifest of medim generate; "
                         "nothing in it is overwritten: use an empty or new folder")


def _missing_outputs(out: Path, entries: dict[int, dict]) -> list[int]:
    """The finished samples whose files are gone, empty, or of another size than written (cut short
    or replaced since): they are made again."""
    missing = []
    for index, entry in entries.items():
        names = [entry[key] for key in ("image", "report") if key in entry]
        written = entry.get("bytes") or {}
        bad = [name for name in names if not (out / name).is_file() or (out / name).stat().st_size == 0
               or (out / name).stat().st_size != written.get(name, (out / name).stat().st_size)]
        if bad:
            logger.warning("%s: sample %d listed as finished but %s missing, empty or not as written; made again",
                           out, index, ", ".join(bad))
            missing.append(index)
    return missing


def _check_inputs(out: Path, header: dict, entries: dict[int, dict], inputs: list, prints: dict[str, str],
                  num_per_prompt: int) -> None:
    """Refuse a resume whose inputs differ from those the finished samples were made from."""
    for path, now in prints.items():
        before = header.get("inputs", {}).get(path)
        if before is not None and before != now:
            raise SystemExit(f"{out}: the input {path} changed since its samples were made (size:sha256 "
                             f"{before} then, {now} now); restore it or use a new --out")
    total = len(inputs) * num_per_prompt
    for entry in entries.values():
        source = source_of(entry)
        given = inputs[entry["index"] // num_per_prompt] if entry["index"] < total else None
        if given is None or _normal(source, bool(prints)) != _normal(given, bool(prints)):
            raise SystemExit(f"{out}: sample {entry['index']} was made from other inputs ({source!r}); "
                             "use the same --prompts/--images/--masks/--num-per-prompt to resume, or a new --out")


def prepare(out: Path, settings: dict, inputs: list, num_per_prompt: int, *, files: list[str]) -> None:
    """Before any rank starts (rank 0): refuse a folder medim did not write, or one made with other
    settings or inputs (`files`: the input files, compared by contents); remove what a killed run
    left half-written; drop finished samples whose files are gone; merge the manifest parts."""
    _check_folder(out)
    for path in out.iterdir():
        if LEFTOVER.fullmatch(path.name):
            path.unlink()
    header, entries, dirty = read(out)
    for entry in entries.values():
        old = {k: entry.get("settings", {}).get(k) for k in SETTING_KEYS}
        if old != settings:
            changed = sorted(k for k in SETTING_KEYS if old[k] != settings[k])
            raise SystemExit(
                f"{out} holds samples made with other settings ({', '.join(changed)}); "
                "use the same options to resume or a new --out"
            )
    prints = fingerprints(files)
    _check_inputs(out, header or {}, entries, inputs, prints, num_per_prompt)
    for index in _missing_outputs(out, entries):
        del entries[index]
        dirty = True
    new_header = {**MARK, "inputs": {**(header or {}).get("inputs", {}), **prints}}
    if dirty or new_header != header:
        merge(out, new_header, entries)

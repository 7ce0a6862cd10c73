import csv
import gzip
import io
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medim.data.datasets import (
    MIMIC_CXR_PREFIX,
    PairLoadError,
    PhantomDataset,
    build_dataset,
    extract_sections,
    iter_pairs,
)
from medim.data.synthetic import PhantomSpec, make_dataset, read_image


def _image(path: Path, mode: str = "RGB", size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _broken(path: Path) -> Path:
    # A PNG cut short: Image.open succeeds on the header, decoding fails.
    _image(path, size=(64, 64))
    path.write_bytes(path.read_bytes()[:80])
    return path


def test_folder_pairs_recursive_with_skips(tmp_path):
    _image(tmp_path / "a.png", mode="L")
    _text(tmp_path / "a.txt", "  Normal chest.\n\nNo effusion. ")
    _image(tmp_path / "sub" / "deep" / "b.JPG")
    _text(tmp_path / "sub" / "deep" / "b.txt", "Left lower lobe opacity.")
    _image(tmp_path / "sub" / "c.jpeg")  # no report
    _image(tmp_path / "d.png")
    _text(tmp_path / "d.txt", "   \n")  # empty report
    _broken(tmp_path / "e.png")
    _text(tmp_path / "e.txt", "Unreadable image.")
    _text(tmp_path / "notes.txt", "no image for this one")

    ds = build_dataset("folder", root=tmp_path)
    assert [r.id for r in ds.records] == ["a.png", "e.png", "sub/deep/b.JPG"]
    assert ds.skipped == Counter(missing_report=1, empty_report=1)
    item = ds[0]
    assert item["report"] == "Normal chest. No effusion."
    assert item["image"].mode == "L" and item["image"].size == (12, 10)  # as loaded
    assert item["meta"] == {"source": "folder", "path": "a.png"}
    with pytest.raises(PairLoadError) as err:
        ds[1]
    assert err.value.reason == "unreadable_image" and err.value.path.name == "e.png"

    stats = Counter()
    items = list(iter_pairs(ds, stats))
    assert [i["id"] for i in items] == ["a.png", "sub/deep/b.JPG"]
    assert stats == Counter(yielded=2, unreadable_image=1, missing_report=1, empty_report=1)
    shard_stats = Counter()
    shard = list(iter_pairs(ds, shard_stats, indices=[2, 1]))
    assert [i["id"] for i in shard] == ["sub/deep/b.JPG"]
    assert shard_stats["yielded"] == 1 and shard_stats["unreadable_image"] == 1


def test_jsonl_manifest(tmp_path):
    _image(tmp_path / "imgs" / "x.png")
    _image(tmp_path / "imgs" / "y.jpg")
    lines = [
        {"image": "imgs/x.png", "report": "Clear lungs.", "age": 61},
        {"image": "imgs/y.jpg", "report": "Cardiomegaly.", "id": "case-2"},
        {"image": "imgs/z.png", "report": "Missing file."},
        {"image": "imgs/x.png", "report": ""},
    ]
    manifest = _text(tmp_path / "m.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = build_dataset("jsonl", manifest=manifest)
    assert [(r.id, r.report) for r in ds.records] == [
        ("imgs/x.png", "Clear lungs."),
        ("case-2", "Cardiomegaly."),
    ]
    assert ds.records[0].meta == {"source": "jsonl", "age": 61}
    assert ds.records[0].image_path == tmp_path / "imgs" / "x.png"
    assert ds.skipped == Counter(missing_image=1, empty_report=1)

    bad = _text(tmp_path / "bad.jsonl", '{"image": "a.png", "report": "x"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        build_dataset("jsonl", manifest=bad)
    with pytest.raises(ValueError, match='"image" path'):
        build_dataset("jsonl", manifest=_text(tmp_path / "bad2.jsonl", '{"report": "x"}\n'))


def _pathgen_tree(tmp_path: Path) -> tuple[list[dict], Path]:
    patches = tmp_path / "patches"
    _image(patches / "TCGA-AA-0001-01Z-00-DX1.ABC_41024_35104.png")
    _image(
        patches / "TCGA-BB-0002-01Z-00-DX1.DEF" / "TCGA-BB-0002-01Z-00-DX1.DEF_13280_13056.png"
    )  # per-slide folder
    _image(patches / "uuid-3_5472_8320.png")  # named by file_id
    records = [
        {
            "wsi_id": "TCGA-AA-0001-01Z-00-DX1.ABC",
            "position": ["41024", "35104"],
            "caption": "Dense infiltrate.",
            "file_id": "uuid-1",
        },
        {"WSI_id": "TCGA-BB-0002-01Z-00-DX1.DEF", "position": [13280, 13056], "caption": "Fibrosis.\n"},
        {
            "wsi_id": "TCGA-CC-0003-01Z-00-DX1.GHI",
            "position": "[5472, 8320]",
            "caption": "Adenocarcinoma.",
            "file_id": "uuid-3",
        },
        {"wsi_id": "TCGA-DD-0004-01Z-00-DX1.JKL", "position": ["1", "2"], "caption": "Not extracted."},
        {"wsi_id": "TCGA-AA-0001-01Z-00-DX1.ABC", "position": ["41024", "35104"], "caption": " "},
    ]
    return records, patches


def test_pathgen_json_join(tmp_path):
    records, patches = _pathgen_tree(tmp_path)
    path = _text(tmp_path / "PathGen.json", json.dumps(records))
    ds = build_dataset("pathgen", records=path, patch_dir=patches)
    assert [r.id for r in ds.records] == [
        "TCGA-AA-0001-01Z-00-DX1.ABC_41024_35104",
        "TCGA-BB-0002-01Z-00-DX1.DEF_13280_13056",
        "TCGA-CC-0003-01Z-00-DX1.GHI_5472_8320",
    ]
    assert ds.records[1].report == "Fibrosis."
    assert ds.records[2].image_path.name == "uuid-3_5472_8320.png"
    assert ds.records[0].meta == {
        "source": "pathgen",
        "wsi_id": "TCGA-AA-0001-01Z-00-DX1.ABC",
        "position": [41024, 35104],
        "file_id": "uuid-1",
    }
    assert ds.skipped == Counter(missing_image=1, empty_report=1)
    assert len(list(iter_pairs(ds))) == 3


def test_pathgen_csv_split_file(tmp_path):
    records, patches = _pathgen_tree(tmp_path)
    path = tmp_path / "pathgen_test_report.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["wsi_id", "position", "caption", "file_id"])
        writer.writeheader()
        for r in records[:1] + records[2:4]:
            writer.writerow(
                {
                    "wsi_id": r["wsi_id"],
                    "position": str(r["position"]),
                    "caption": r["caption"],
                    "file_id": r.get("file_id", ""),
                }
            )
    ds = build_dataset("pathgen", records=path, patch_dir=patches)
    assert [r.id for r in ds.records] == [
        "TCGA-AA-0001-01Z-00-DX1.ABC_41024_35104",
        "TCGA-CC-0003-01Z-00-DX1.GHI_5472_8320",
    ]
    assert ds.skipped == Counter(missing_image=1)
    bad = _text(tmp_path / "bad.csv", "caption,position\nx,[1, 2]\n")
    with pytest.raises(ValueError, match="wsi_id"):
        build_dataset("pathgen", records=bad, patch_dir=patches)


_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  Cough.

 FINDINGS:
 The lungs are clear.  No pleural effusion
 or pneumothorax.

 IMPRESSION:
 No acute cardiopulmonary process.
"""


def _mimic_tree(tmp_path: Path) -> dict:
    jpg, rep = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    rows = [  # (subject, study, dicom, split, view)
        ("10000032", "50414267", "d1", "train", "PA"),
        ("10000032", "50414267", "d2", "train", "LATERAL"),
        ("10000764", "57375967", "d3", "test", "AP"),
        ("11000011", "51111111", "d4", "train", "PA"),  # report has no findings/impression
        ("12000012", "52222222", "d5", "train", "PA"),  # no report file
        ("13000013", "53333333", "d6", "validate", "PA"),  # image not downloaded
    ]
    for subject, study, dicom, _, _ in rows:
        if dicom != "d6":
            _image(jpg / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", mode="L")
    _text(rep / "files" / "p10" / "p10000032" / "s50414267.txt", _REPORT)
    _text(rep / "files" / "p10" / "p10000764" / "s57375967.txt", " IMPRESSION: Small left effusion.\n")
    _text(rep / "files" / "p11" / "p11000011" / "s51111111.txt", " FINAL REPORT\n INDICATION: pain.\n")
    split = tmp_path / "mimic-cxr-2.0.0-split.csv.gz"
    with gzip.open(split, "wt", newline="") as f:
        f.write("dicom_id,study_id,subject_id,split\n")
        f.writelines(f"{d},{st},{su},{sp}\n" for su, st, d, sp, _ in rows)
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    meta.write_text("dicom_id,ViewPosition\n" + "".join(f"{d},{v}\n" for _, _, d, _, v in rows))
    return {"jpg_root": jpg, "reports_root": rep, "split_csv": split, "metadata_csv": meta}


def test_extract_sections():
    assert (
        extract_sections(_REPORT)
        == "The lungs are clear. No pleural effusion or pneumothorax. No acute cardiopulmonary process."
    )
    assert extract_sections(_REPORT, ("impression",)) == "No acute cardiopulmonary process."
    assert extract_sections(_REPORT, ("impression", "findings")).startswith("No acute")
    assert extract_sections("INDICATION: cough.") == ""


def test_mimic_cxr_split_and_join(tmp_path):
    tree = _mimic_tree(tmp_path)
    train = build_dataset(
        "mimic-cxr",
        jpg_root=tree["jpg_root"],
        reports_root=tree["reports_root"],
        split_csv=tree["split_csv"],
        split="train",
    )
    assert [r.id for r in train.records] == ["d1", "d2"]  # two views of one study share its report
    assert train.records[0].report == train.records[1].report == extract_sections(_REPORT)
    assert train.records[0].meta == {
        "source": "mimic-cxr",
        "subject_id": "10000032",
        "study_id": "50414267",
        "dicom_id": "d1",
        "split": "train",
    }
    assert train.skipped == Counter(empty_report=1, missing_report=1)

    test = build_dataset(
        "mimic-cxr",
        jpg_root=tree["jpg_root"] / "files",
        reports_root=tree["reports_root"],
        split_csv=tree["split_csv"],
        split="test",
        prefix=True,
    )
    assert [(r.id, r.report) for r in test.records] == [("d3", MIMIC_CXR_PREFIX + "Small left effusion.")]
    assert test.records[0].report.startswith(
        "The image is a radiograph of the chest, showing the thoracic cavity structures. Small"
    )

    val = build_dataset(
        "mimic-cxr",
        jpg_root=tree["jpg_root"],
        reports_root=tree["reports_root"],
        split_csv=tree["split_csv"],
        split="val",
    )
    assert len(val) == 0 and val.skipped == Counter(missing_image=1)

    frontal = build_dataset(
        "mimic-cxr",
        jpg_root=tree["jpg_root"],
        reports_root=tree["reports_root"],
        split_csv=tree["split_csv"],
        split=None,
        metadata_csv=tree["metadata_csv"],
        views=("PA", "AP"),
    )
    assert [r.id for r in frontal.records] == ["d1", "d3"] and frontal.skipped["other_view"] == 1
    assert frontal.records[1].meta["view"] == "AP" and frontal.records[1].meta["split"] == "test"


def test_mimic_cxr_without_split_csv(tmp_path):
    tree = _mimic_tree(tmp_path)
    ds = build_dataset("mimic-cxr", jpg_root=tree["jpg_root"], reports_root=tree["reports_root"], split=None)
    assert [r.id for r in ds.records] == ["d1", "d2", "d3"]
    assert "split" not in ds.records[0].meta and ds[2]["image"].mode == "L"


def test_mimic_cxr_bad_arguments(tmp_path):
    tree = _mimic_tree(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("mimic-cxr", jpg_root=tree["jpg_root"], split_csv=tree["split_csv"], split="dev")
    with pytest.raises(ValueError, match="needs split_csv"):
        build_dataset("mimic-cxr", jpg_root=tree["jpg_root"])
    with pytest.raises(ValueError, match="sections must be"):
        build_dataset("mimic-cxr", jpg_root=tree["jpg_root"], split=None, sections=("history",))
    with pytest.raises(ValueError, match="missing columns"):
        build_dataset("mimic-cxr", jpg_root=tree["jpg_root"], split_csv=tree["metadata_csv"])
    with pytest.raises(FileNotFoundError, match="jpg_root"):
        build_dataset("mimic-cxr", jpg_root=tmp_path / "nowhere", split=None)


def test_phantom_dataset_matches_generator(caplog):
    ds = build_dataset("phantom", n=5, seed=9)
    reference = make_dataset(5, seed=9)
    with caplog.at_level(logging.INFO, logger="medim.data.datasets"):
        items = list(iter_pairs(ds))
    assert "read 5 pairs" in caplog.text
    for item, (image, report, spec) in zip(items, reference):
        assert item["report"] == report
        assert np.array_equal(np.asarray(item["image"]), np.asarray(image))
        assert PhantomSpec.from_dict(item["meta"]["spec"]) == spec == read_image(item["image"])
    assert ds[-1]["id"] == "phantom-9-4"
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="size must be"):
        PhantomDataset(3, size=4)


def test_build_dataset_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"kind must be one of \['folder', 'hf', 'jsonl', 'mimic-cxr', 'pathgen', 'phantom'\]"
    ):
        build_dataset("coco")
    with pytest.raises(TypeError, match="unknown arguments \\['path'\\]; accepted: \\['root'\\]"):
        build_dataset("folder", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="root"):
        build_dataset("folder", root=tmp_path / "missing")


# ---------------------------------------------------------------- the hf kind (Hugging Face datasets)
def _hf_table(tmp_path: Path):
    """A dataset with one image column of each stored kind, report columns and ids, saved to disk."""
    datasets = pytest.importorskip("datasets")
    pairs = make_dataset(4, seed=3, size=32)
    images = [image for image, _, _ in pairs]
    paths = [str(_image(tmp_path / f"files/{i}.png", size=(20, 16))) for i in range(4)]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    deep = np.random.default_rng(0).integers(0, 4096, (4, 16, 16), dtype=np.uint16)
    features = datasets.Features({
        "image": datasets.Image(), "png": datasets.Value("binary"), "file": datasets.Value("string"),
        "deep": datasets.Array2D((16, 16), "uint16"), "findings": datasets.Value("string"),
        "impression": datasets.Value("string"), "uid": datasets.Value("int64")})
    data = datasets.Dataset.from_dict({
        "image": images, "png": encoded, "file": paths, "deep": deep,
        "findings": [report for _, report, _ in pairs[:3]] + [" \n"],
        "impression": ["No change.", None, "Stable.", None], "uid": [10, 11, 12, 13]}, features=features)
    data.save_to_disk(str(tmp_path / "saved"))
    return data, pairs, paths, deep


def test_hf_columns_and_image_kinds(tmp_path):
    from medim.data.hf_dataset import HFPairedDataset
    from medim.data.images import load_image

    data, pairs, paths, deep = _hf_table(tmp_path)
    ds = build_dataset("hf", path=tmp_path / "saved", report_column="findings", id_column="uid")
    assert isinstance(ds, HFPairedDataset) and len(ds) == 4
    item = ds[1]
    assert item["id"] == "11" and item["report"] == pairs[1][1] and item["meta"] == {"source": "hf", "index": 1}
    assert np.array_equal(np.asarray(item["image"]), np.asarray(pairs[1][0].convert("RGB")))
    expected = {"png": pairs[2][0].convert("RGB"), "file": load_image(paths[2]), "deep": load_image(deep[2])}
    for column, image in expected.items():
        got = build_dataset("hf", path=tmp_path / "saved", image_column=column, report_column="findings")[2]
        assert got["image"].mode == "RGB" and np.array_equal(np.asarray(got["image"]), np.asarray(image)), column
    # A template joins several columns; a missing value reads as empty.
    ds = build_dataset("hf", path=tmp_path / "saved", report_template="FINDINGS: {findings} IMPRESSION: {impression}")
    assert ds[0]["report"] == f"FINDINGS: {pairs[0][1]} IMPRESSION: No change."
    assert ds[1]["report"] == f"FINDINGS: {pairs[1][1]} IMPRESSION:"
    # Its data are identified by the saved dataset's own fingerprint (from its contents), plus the columns.
    fingerprint = pytest.importorskip("datasets").load_from_disk(str(tmp_path / "saved"))._fingerprint
    assert ds.fingerprint == {"dataset": fingerprint, "split": None,
                              "image_column": "image", "report_column": None,
                              "report_template": "FINDINGS: {findings} IMPRESSION: {impression}", "id_column": None}
    # The last row's report is blank in every column: skipped and counted like any empty report.
    stats = Counter()
    assert [it["id"] for it in iter_pairs(build_dataset("hf", path=tmp_path / "saved", report_column="findings"),
                                          stats)] == ["0", "1", "2"]
    assert stats == Counter(yielded=3, empty_report=1)
    with pytest.raises(PairLoadError, match="empty report"):
        ds[3]


def test_hf_unreadable_images_are_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    image = Image.new("L", (8, 8))
    rows = {"image": [image, {"bytes": b"\x89PNG not really", "path": None}, None, image],
            "report": ["One.", "Two.", "Three.", "Four."]}
    data = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "report": datasets.Value("string")}))
    data.save_to_disk(str(tmp_path / "saved"))
    stats = Counter()
    items = list(iter_pairs(build_dataset("hf", path=tmp_path / "saved"), stats))
    assert [it["id"] for it in items] == ["0", "3"]
    assert stats == Counter(yielded=2, unreadable_image=1, missing_image=1)
    # Streamed, the same rows are read and skipped the same way; a stream is read in order only.
    streamed, stats = build_dataset("hf", path=tmp_path / "saved", streaming=True), Counter()
    assert [it["id"] for it in iter_pairs(streamed, stats)] == ["0", "3"]
    assert stats == Counter(yielded=2, unreadable_image=1, missing_image=1)
    with pytest.raises(ValueError, match="indices: a streamed dataset is read in order"):
        next(iter_pairs(streamed, indices=[1]))
    with pytest.raises(PairLoadError, match="cannot read image of row 1"):
        list(streamed)  # iterating it directly raises on the first unusable row


def test_hf_bad_options_name_the_option(tmp_path):
    datasets = pytest.importorskip("datasets")
    from medim.data.hf_dataset import HFColumns, HFPairedDataset

    _hf_table(tmp_path)
    saved = tmp_path / "saved"
    columns = "image, png, file, deep, findings, impression, uid"
    for options, message in [
        (dict(), f"report_column: {saved} has no column 'report'; its columns: {columns}"),
        (dict(report_column="text"), "report_column: .* has no column 'text'"),
        (dict(image_column="img", report_column="findings"), "image_column: .* has no column 'img'"),
        (dict(report_template="{findings} {notes}"), "report_template: .* has no column 'notes'"),
        (dict(report_template="{0}"), "report_template must name columns"),
        (dict(report_template="{findings"), "report_template .* is not a format string"),
        (dict(report_column="findings", report_template="{findings}"), "report_column or report_template, not both"),
        (dict(report_column="findings", id_column="id"), "id_column: .* has no column 'id'"),
        (dict(image_column="uid", report_column="findings"), "image_column: column 'uid' holds .*int64.*, not images"),
        (dict(report_column=""), "report_column must be a non-empty string"),
        (dict(report_column="findings", split="test"), "split 'test': .* holds a single dataset"),
        (dict(report_column="findings", split=""), "split must be a non-empty string"),
        (dict(report_column="findings", revision="main"), "revision: not used with a save_to_disk folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_dataset("hf", path=saved, **options)
    with pytest.raises(TypeError, match="streaming must be a bool"):
        build_dataset("hf", path=saved, report_column="findings", streaming="yes")
    data = datasets.load_from_disk(str(saved))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "splits"))
    assert len(build_dataset("hf", path=tmp_path / "splits", report_column="findings")) == 4  # "train"
    assert len(build_dataset("hf", path=tmp_path / "splits", split="test", report_column="findings")) == 1
    with pytest.raises(ValueError, match="split 'val': .* holds the splits train, test"):
        build_dataset("hf", path=tmp_path / "splits", split="val", report_column="findings")
    with pytest.raises(ValueError, match="split: the dataset holds no rows"):  # (datasets cannot reload one saved)
        HFPairedDataset(data.select([]), HFColumns(report_column="findings"))


def test_hf_without_the_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'medim-diffusion[hf]'")):
        build_dataset("hf", path=tmp_path)

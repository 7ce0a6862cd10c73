"""DICOM inputs (medim.data.dicom through medim.data.images): pydicom's display chain, the files it
refuses, and no header value in anything medim writes or logs."""

import json
import logging
import shutil
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder  # noqa: E402
from pydicom.uid import RLELossless  # noqa: E402

from medim.commands.manifest import is_header  # noqa: E402
from medim.data.datasets import build_dataset, iter_pairs  # noqa: E402
from medim.data.dicom import is_dicom, read_dicom  # noqa: E402
from medim.data.images import load_image, read_image_file  # noqa: E402


def expected_display(path: str) -> np.ndarray:
    """The 8-bit image by the standard chain, computed here from pydicom's functions and the
    standard's window output range (PS3.3 C.11.2.1.2), independently of medim."""
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds)
    shown = apply_voi_lut(values, ds).astype(np.float64)
    if "WindowCenter" in ds:
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        lo, hi = lo * slope + intercept, hi * slope + intercept
    else:
        lo, hi = shown.min(), shown.max()
    unit = (np.clip(shown, lo, hi) - lo) / (hi - lo)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * 255).astype(np.uint8)


def gray(path) -> np.ndarray:
    rgb = np.asarray(load_image(path))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # rescale slope/intercept, no window: the image's own range
        "MR_small.dcm",  # window centre/width
        "6154",  # MONOCHROME1 computed radiograph, 12 bits stored, rescale + window
    ],
)
def test_display_chain_matches_pydicom(name):
    path = get_testdata_file(name)
    shown = gray(path)
    assert shown.shape == pydicom.dcmread(path).pixel_array.shape
    assert np.array_equal(shown, expected_display(path))
    assert shown.max() > shown.min()


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("6154"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "m2.dcm")
    m1, m2 = gray(get_testdata_file("6154")).astype(int), gray(tmp_path / "m2.dcm").astype(int)
    assert np.abs(m1 + m2 - 255).max() <= 1  # rounding at .5 only
    assert (m1 != m2).any()


def test_bits_stored_are_respected(tmp_path):
    # 12 bits stored in 16: whatever sits in the 4 unused high bits must not change the image.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = ds.pixel_array.astype(np.uint16)
    assert raw.max() < 2**12
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    ds.PixelData = raw.tobytes()
    ds.save_as(tmp_path / "clean.dcm")
    ds.PixelData = (raw | 0xA000).astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "noisy.dcm")
    assert np.array_equal(gray(tmp_path / "clean.dcm"), gray(tmp_path / "noisy.dcm"))
    assert np.array_equal(gray(tmp_path / "clean.dcm"), expected_display(str(tmp_path / "clean.dcm")))


def test_any_name_with_the_preamble_is_dicom(tmp_path):
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "IM000001")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    assert is_dicom(tmp_path / "IM000001") and is_dicom(tmp_path / "absent.dcm")
    assert not is_dicom(tmp_path / "x.png") and not is_dicom(tmp_path / "missing")
    assert np.array_equal(gray(tmp_path / "IM000001"), gray(get_testdata_file("MR_small.dcm")))
    pixels = read_dicom(tmp_path / "IM000001")
    assert pixels.dtype == np.float64 and pixels.min() >= 0 and pixels.max() <= 1


def test_compressed_pixel_data_goes_through_the_plugins():
    # RLE is decoded by pydicom's own plugin; the pixels are MR_small's.
    assert np.array_equal(gray(get_testdata_file("MR_small_RLE.dcm")), gray(get_testdata_file("MR_small.dcm")))


def test_colour_dicom_becomes_rgb():
    rgb = np.asarray(load_image(get_testdata_file("SC_rgb_rle.dcm")))
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    assert np.array_equal(rgb, ds.pixel_array)


def test_missing_plugin_names_it(monkeypatch):
    path = get_testdata_file("MR_small_RLE.dcm")
    monkeypatch.setattr(type(get_decoder(RLELossless)), "is_available", property(lambda self: False))
    with pytest.raises(ValueError, match=r"MR_small_RLE.dcm: DICOM pixel data is compressed as RLE Lossless .*"
                                         r"pylibjpeg-rle"):
        load_image(path)


def test_jpeg_ls_without_its_plugin():
    if get_decoder("1.2.840.10008.1.2.4.80").is_available:
        pytest.skip("a JPEG-LS plugin is installed")
    with pytest.raises(ValueError, match="JPEG-LS Lossless Image Compression .*pylibjpeg-libjpeg"):
        load_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))


@pytest.mark.parametrize(
    "name, problem",
    [
        ("rtdose.dcm", r"multi-frame DICOM \(15 frames\) is not supported"),
        ("test-SR.dcm", "DICOM object without pixel data"),
        ("DICOMDIR", "DICOM object without pixel data"),
    ],
)
def test_refused_objects(name, problem):
    path = get_testdata_file(name)
    with pytest.raises(ValueError, match=rf"^images\[1\]: .*{name}: {problem}"):
        read_image_file(path, lambda image: image, prefix="images[1]: ")


def test_not_a_dicom_file(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match=r"x.dcm: "):
        load_image(tmp_path / "x.dcm")


def test_missing_pydicom_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install 'medim-diffusion\[dicom\]'"):
        read_dicom(get_testdata_file("MR_small.dcm"))


# ----------------------------------------------------------------------------- privacy

SECRETS = {
    "PatientName": "Qzxname^Secretfirst",
    "PatientID": "PIDQZX4417",
    "PatientBirthDate": "19070809",
    "StudyDate": "19110213",
    "InstitutionName": "Qzx Secret Infirmary",
    "ReferringPhysicianName": "Drqzx^Hidden",
    "AccessionNumber": "ACCQZX99",
    "StudyDescription": "QZX STUDY TEXT",
}


def _secret_copy(source: str, path: Path, **changes) -> Path:
    ds = pydicom.dcmread(source)
    for key, value in {**SECRETS, **changes}.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def _secret_files(folder: Path) -> list[Path]:
    return [
        _secret_copy(get_testdata_file("MR_small.dcm"), folder / "good.dcm"),
        # Refused, or failing inside pydicom with a message that would quote the value.
        _secret_copy(get_testdata_file("rtdose.dcm"), folder / "frames.dcm"),
        _secret_copy(get_testdata_file("MR_small.dcm"), folder / "badvoi.dcm", VOILUTFunction="QZXFUNC"),
        _secret_copy(get_testdata_file("MR_small.dcm"), folder / "noext", PatientComments="QZX COMMENT"),
    ]


def _assert_no_secrets(texts: dict[str, str]) -> None:
    needles = [*SECRETS.values(), "Qzxname", "Secretfirst", "QZXFUNC", "QZX COMMENT", "Drqzx"]
    leaks = [(where, needle) for where, text in texts.items() for needle in needles if needle.lower() in text.lower()]
    assert not leaks, f"header values leaked: {leaks}"


def _written(folder: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", errors="replace") for p in folder.rglob("*") if p.is_file()}


def test_pydicom_warnings_quoting_values_are_silenced(tmp_path, caplog):
    # An invalid Number of Frames: pydicom warns and logs quoting it; medim says only what is wrong.
    caplog.set_level(logging.DEBUG)
    path = _secret_copy(get_testdata_file("MR_small.dcm"), tmp_path / "x.dcm", NumberOfFrames="7771")
    data = path.read_bytes()
    assert data.count(b"7771") == 1
    path.write_bytes(data.replace(b"7771", b"QZXN"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="x.dcm: DICOM Number of Frames is not a number") as err:
            load_image(path)
    said = {"log": caplog.text, "error": str(err.value), "warnings": "\n".join(str(w.message) for w in caught)}
    _assert_no_secrets(said)
    assert not any("QZXN" in text for text in said.values())


@pytest.mark.slow
def test_no_header_value_reaches_what_medim_writes(tmp_path, caplog, capsys):
    from medim.cli import main

    caplog.set_level(logging.DEBUG)
    files = _secret_files(tmp_path / "in")
    out = tmp_path / "reports"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "report", "--model", "medim-demo", "--device", "cpu", "--steps", "2",
                     "--images", *map(str, files), "--out", str(out)]) == 0
        folder = tmp_path / "pairs"
        folder.mkdir()
        for name in ("good.dcm", "frames.dcm", "badvoi.dcm"):
            shutil.copy(tmp_path / "in" / name, folder / name)
            (folder / name).with_suffix(".txt").write_text("No focal lesion.")
        assert main(["cache", "--dataset", "folder", "--data-root", str(folder), "--model", "medim-demo",
                     "--device", "cpu", "--out", str(tmp_path / "cache")]) == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    entries = [e for e in lines if not is_header(e)]
    assert ["report" in e for e in entries] == [True, False, False, True]
    assert "multi-frame DICOM (15 frames)" in entries[1]["error"]
    assert "could not be applied" in entries[2]["error"]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["complete"] and [sh["num_items"] for sh in index["shards"]] == [1]
    assert index["shards"][0]["skipped"] == {"unreadable_image": 2}
    captured = capsys.readouterr()
    _assert_no_secrets({
        **_written(out), **_written(tmp_path / "cache"), "stdout": captured.out, "stderr": captured.err,
        "log": caplog.text, "warnings": "\n".join(str(w.message) for w in caught),
    })


def test_folder_dataset_reads_dicom_without_leaks(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    files = _secret_files(tmp_path)
    for path in files:
        path.with_suffix(".txt").write_text("No focal lesion.")
    ds = build_dataset("folder", root=tmp_path)
    assert [r.id for r in ds.records] == ["badvoi.dcm", "frames.dcm", "good.dcm"]  # "noext" is not indexed
    stats = Counter()
    items = list(iter_pairs(ds, stats))
    assert [item["id"] for item in items] == ["good.dcm"] and items[0]["image"].mode == "L"
    assert stats["unreadable_image"] == 2
    _assert_no_secrets({"log": caplog.text, "meta": json.dumps([item["meta"] for item in items])})
    # A manifest may name DICOM files without a suffix.
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "noext", "report": "No focal lesion."}) + "\n")
    items = list(iter_pairs(build_dataset("jsonl", manifest=tmp_path / "pairs.jsonl")))
    assert np.array_equal(np.asarray(items[0]["image"]), np.asarray(load_image(files[0]))[..., 0])

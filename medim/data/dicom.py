"""DICOM files as images: the pixels a radiology viewer shows, computed by pydicom.

`read_dicom` decodes one single-frame DICOM image (pydicom, the `dicom` extra:
`pip install 'medim-diffusion[dicom]'`) and applies the standard display chain with pydicom's own functions:
pixel values as Bits Stored defines them (pydicom masks the unused bits and sign-extends signed
data), the Modality LUT (rescale slope/intercept or a LUT), then the VOI LUT or the window
centre/width, mapped onto [0, 1] over the VOI's output range (without a VOI, the image's own
min..max, as medim does for 16-bit PNG X-rays), MONOCHROME1 inverted. Colour images (RGB, YBR_*
converted by pydicom, PALETTE COLOR through its LUT) come back as RGB. `medim.data.images` turns the
result into the 8-bit image every medim input path reads, so a `.dcm` file (or any file with the
DICOM preamble) works wherever an image file does.

Privacy: no header value (patient name, ID, dates, institution, any element) is put into an error,
a log line or a warning. Errors name the file and the problem only; pydicom's own warnings and log
records, which may quote element values, are silenced while a file is read.

Example:
    >>> from medim.data.dicom import is_dicom, read_dicom
    >>> is_dicom("cxr.dcm"), read_dicom("cxr.dcm").shape      # (True, (2544, 3056)), floats in [0, 1]
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["DICOM_SUFFIXES", "is_dicom", "read_dicom"]

DICOM_SUFFIXES = (".dcm", ".dicom")
GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The part-10 file format: a 128-byte preamble, then these four bytes.
MAGIC_OFFSET, MAGIC = 128, b"DICM"


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether `path` is read as DICOM: a `.dcm` / `.dicom` name, or "DICM" at byte 128 whatever the
    name (DICOM files from a PACS often have no suffix).

    Example:
        >>> is_dicom("IM000001")
        True
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(MAGIC_OFFSET + len(MAGIC))
    except OSError:
        return False
    return head[MAGIC_OFFSET:] == MAGIC


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as e:
        raise ImportError("reading DICOM files needs pydicom: pip install 'medim-diffusion[dicom]'") from e
    return pydicom


@contextmanager
def _quiet() -> Iterator[None]:
    # pydicom warns (and logs) about odd elements quoting their values, e.g. an invalid date: none of
    # them may reach a log. Our own errors say what went wrong instead. Its child loggers
    # (pydicom.pixels...) propagate past a disabled parent, so each is disabled.
    names = ["pydicom", *(name for name in list(logging.root.manager.loggerDict) if name.startswith("pydicom."))]
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.disabled for logger in loggers]
    try:
        for logger in loggers:
            logger.disabled = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, disabled in zip(loggers, before):
            logger.disabled = disabled


def _check_image(ds, path: Path) -> None:
    """A single-frame image in a photometric interpretation we show, whose pixel data can be decoded
    here; every error names the file and the problem, never an element's value."""
    from pydicom.pixels import get_decoder

    if not any(name in ds for name in PIXEL_ELEMENTS):
        raise ValueError(f"{path}: DICOM object without pixel data (e.g. a report or a DICOMDIR) is not an image")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: DICOM Number of Frames is not a number") from None
    if frames > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; "
                         "save the frame you want as a single-frame file")
    if str(ds.get("PhotometricInterpretation", "")).strip() not in GRAY + COLOUR:
        raise ValueError(f"{path}: DICOM photometric interpretation is missing or not supported "
                         f"(medim reads {', '.join(GRAY + COLOUR)})")
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None:
        return  # pydicom's decoding says what is missing
    try:
        decoder = get_decoder(syntax)
    except Exception:  # pydicom raises for a transfer syntax it has no decoder class for
        raise ValueError(f"{path}: DICOM transfer syntax has no pixel-data decoder in pydicom") from None
    if not decoder.is_available:
        plugins = "; ".join(decoder.missing_dependencies)
        raise ValueError(f"{path}: DICOM pixel data is compressed as {decoder.UID.name} and no pydicom "
                         f"pixel-data plugin for it is installed; install one of: {plugins}")


def _display(pixels: np.ndarray, ds) -> np.ndarray:
    """The display chain: [0, 1] floats (grayscale HxW or colour HxWx3)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        return rgb / np.iinfo(rgb.dtype).max  # LUT entries use their whole 8 or 16 bits
    if photometric in COLOUR:  # YBR_* already converted to RGB by pydicom
        return pixels / (2 ** int(ds.BitsStored) - 1)
    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):
        shown = apply_voi(values, ds)
        lo, hi = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        shown = apply_windowing(values, ds)
        # pydicom maps everything below the window to its lowest output, above it to its highest:
        # those two are the range the window is shown over.
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
    else:
        shown, lo, hi = values, float(values.min()), float(values.max())
    shown = (np.clip(shown.astype(np.float64), lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros(shown.shape)
    return 1.0 - shown if photometric == "MONOCHROME1" else shown


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """The image of a single-frame DICOM file as a viewer shows it: float64 in [0, 1], HxW for
    grayscale (MONOCHROME1 inverted), HxWx3 for colour.

    Multi-frame files, objects without pixel data (reports, DICOMDIRs) and compressed pixel data
    without its pydicom plugin raise ValueError naming the file and the problem (and the plugin);
    no error or log line ever holds a header value. Needs pydicom (`pip install 'medim-diffusion[dicom]'`).

    Example:
        >>> pixels = read_dicom("cxr.dcm")
        >>> pixels.dtype, float(pixels.min()) >= 0.0, float(pixels.max()) <= 1.0
        (dtype('float64'), True, True)
    """
    pydicom = _pydicom()
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DICOM file {path} does not exist")
    with _quiet():
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # any failure: pydicom's messages may quote element values
            raise ValueError(f"{path}: not a DICOM file pydicom can read") from None
        _check_image(ds, path)
        try:
            pixels = ds.pixel_array
        except Exception as e:  # as above
            raise ValueError(f"{path}: DICOM pixel data could not be decoded ({type(e).__name__})") from None
        try:
            return _display(pixels, ds)
        except Exception as e:  # as above
            raise ValueError(f"{path}: the DICOM Modality LUT, VOI LUT or window could not be applied "
                             f"({type(e).__name__})") from None

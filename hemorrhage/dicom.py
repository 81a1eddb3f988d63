"""Reading head CT DICOM slices: a typed header first (no pixels), pixels and Hounsfield units later.

    from hemorrhage.dicom import read_header, read_hu
    h = read_header("study/IM0001")                 # DicomHeader; pixel data not read
    s = read_hu("study/IM0001")                     # HUSlice: header, float32 HU, quirk_fixed

pydicom 3 reads the files (`dcmread`; `read_file` is gone); compressed transfer syntaxes (JPEG
baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE) decode through the pylibjpeg plugins.
Every failure is a `DicomReadError` whose message starts with the file's path. The header's elements
and the pixel element's extent are read from the raw bytes (`hemorrhage.dicom_raw`).

HU = stored * RescaleSlope + RescaleIntercept, computed in float32 after converting the stored values
(NumPy 2 keeps uint16 + negative intercept in uint16 and wraps: the original's NumPy 2 breakage). The
RSNA 2019 data has slices stored as unsigned 12 bit with intercept 0 whose raw values are HU mod 4096;
the community fix (raw + 1000, wrapped into 0..4095, intercept -1000) is `fix_bits_stored_12`, applied
by `to_hu` when `needs_quirk_fix` says so (switchable, and reported per slice so callers can count it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from hemorrhage.dicom_raw import (
    NATIVE_SYNTAXES,
    element_floats,
    element_int,
    element_text,
    element_value,
    pixel_element_problem,
    split_values,
)

QUIRK_SHIFT, QUIRK_MODULUS, QUIRK_INTERCEPT = 1000, 4096, -1000.0


class DicomReadError(ValueError):
    """A file cannot be used as a DICOM slice; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # survives the trip back from a worker process
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class DicomHeader:
    """What series discovery and windowing need from one file, read without its pixel data."""

    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column direction cosines
    position: tuple[float, ...] | None  # ImagePositionPatient of the first pixel, mm
    instance_number: int | None
    rows: int  # 0 for objects without an image (structured reports, presentation states)
    columns: int
    n_frames: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 signed
    photometric: str
    slope: float
    intercept: float
    window_center: tuple[float, ...]  # every value of a multi-valued WindowCenter
    window_width: tuple[float, ...]
    transfer_syntax: str
    pixel_problem: str = ""  # set when the header pass already sees missing or truncated pixel data

    @property
    def is_image(self) -> bool:
        return self.rows > 0 and self.columns > 0

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def normal(self) -> np.ndarray | None:
        """Slice normal: the cross product of the row and column direction cosines (unit length)."""
        if self.orientation is None:
            return None
        o = np.asarray(self.orientation, np.float64)
        n = np.cross(o[:3], o[3:])
        norm = float(np.linalg.norm(n))
        return n / norm if norm > 1e-6 else None

    @property
    def needs_quirk_fix(self) -> bool:
        return needs_quirk_fix(self)


@dataclass
class HUSlice:
    header: DicomHeader
    hu: np.ndarray  # float32, (rows, columns) or (frames, rows, columns)
    quirk_fixed: bool  # the BitsStored-12 fix was applied to this slice


# ----------------------------------------------------------------------------------------- header


def _rescale(ds: Dataset, keyword: str, default: float, path: str) -> float:
    values = element_floats(ds, keyword)
    if not values and (value := element_value(ds, keyword)) not in (None, ""):
        raise DicomReadError(path, f"{keyword} {value!r} is not a number")
    return values[0] if values else default


def header_from_dataset(ds: Dataset, path: str | Path) -> DicomHeader:
    """The typed header of a dataset read by pydicom (with or without its pixel data)."""
    path = str(path)
    meta = getattr(ds, "file_meta", None)
    sop = element_text(ds, "SOPInstanceUID")
    if not sop and meta is not None:
        sop = element_text(meta, "MediaStorageSOPInstanceUID")
    study, series = element_text(ds, "StudyInstanceUID"), element_text(ds, "SeriesInstanceUID")
    uids = (("SOPInstanceUID", sop), ("StudyInstanceUID", study), ("SeriesInstanceUID", series))
    missing = [k for k, v in uids if not v]
    if missing:
        raise DicomReadError(path, f"not a usable DICOM instance: no {', '.join(missing)}")
    orientation = element_floats(ds, "ImageOrientationPatient")
    position = element_floats(ds, "ImagePositionPatient")
    image_type = split_values(element_value(ds, "ImageType") or "")
    return DicomHeader(
        path=path, study_uid=study, series_uid=series, sop_uid=sop,
        modality=element_text(ds, "Modality").upper(),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        orientation=orientation if len(orientation) == 6 else None,
        position=position if len(position) == 3 else None,
        instance_number=element_int(ds, "InstanceNumber", None),
        rows=element_int(ds, "Rows", 0) or 0, columns=element_int(ds, "Columns", 0) or 0,
        n_frames=max(1, element_int(ds, "NumberOfFrames", 1) or 1),
        bits_allocated=element_int(ds, "BitsAllocated", 16) or 16,
        bits_stored=element_int(ds, "BitsStored", 16) or 16,
        pixel_representation=element_int(ds, "PixelRepresentation", 0) or 0,
        photometric=element_text(ds, "PhotometricInterpretation", "MONOCHROME2").upper(),
        slope=_rescale(ds, "RescaleSlope", 1.0, path), intercept=_rescale(ds, "RescaleIntercept", 0.0, path),
        window_center=element_floats(ds, "WindowCenter"), window_width=element_floats(ds, "WindowWidth"),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
    )


# ----------------------------------------------------------------------------------------- reading


def _dcmread(fp: BinaryIO, path: str, stop_before_pixels: bool) -> Dataset:
    """dcmread that also takes files without the 128-byte preamble, and names the file on failure."""
    if os.fstat(fp.fileno()).st_size == 0:
        raise DicomReadError(path, "empty file")
    try:
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble/'DICM': raw datasets like this exist in old archives, so try harder below
    except Exception as e:  # noqa: BLE001 - the parser raises many types on damaged files; re-raised with the path
        raise DicomReadError(path, f"not readable as DICOM ({type(e).__name__}: {e})") from e
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as e:  # noqa: BLE001 - as above
        raise DicomReadError(path, f"not a DICOM file (no 'DICM' prefix; {type(e).__name__}: {e})") from e
    # a forced read of any file "succeeds" with garbage elements: demand the UIDs of an instance
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        raise DicomReadError(path, "not a DICOM file (no 'DICM' prefix and no SOP/Study Instance UID)")
    if "TransferSyntaxUID" not in ds.file_meta:
        # pydicom found the encoding while parsing; the pixel decoder needs it spelt out
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _lenient():
    """No value validation while reading: the RSNA files carry UIDs like 'ID_3a8f...' that are not valid
    DICOM UIDs, and pydicom 3 would log a warning for each of them (millions on the full set); what this
    module needs is checked here. Global pydicom state, restored on exit; harmless if threads overlap."""
    return pydicom.config.disable_value_validation()


def read_header(path: str | Path) -> DicomHeader:
    """Header of one file; pixel data is not read (``stop_before_pixels=True``), only its presence checked."""
    path = str(path)
    try:
        with open(path, "rb") as fp, _lenient():
            ds = _dcmread(fp, path, stop_before_pixels=True)
            h = header_from_dataset(ds, path)
            problem = pixel_element_problem(fp, h)
    except OSError as e:
        raise DicomReadError(path, f"cannot open ({e.strerror or e})") from e
    return replace(h, pixel_problem=problem) if problem else h


def _incomplete(path: str) -> DicomReadError:
    """Why a full read came back without pixel data (or, for a cut encapsulated file, empty)."""
    with open(path, "rb") as fp, _lenient():
        ds = _dcmread(fp, path, stop_before_pixels=True)
        header_from_dataset(ds, path)  # raises when the header itself is unusable
        cut = len(fp.read(4)) == 4  # bytes after the header: a pixel element that the full read lost
    return DicomReadError(path, "truncated: file ends inside the pixel data" if cut else "no pixel data")


def native_pixels(ds: Dataset, h: DicomHeader) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian single-frame grey slice, viewed in place.

    The same values and dtype as pydicom's ``pixel_array``, without its copy: pydicom masks the unused
    high bits (BitsStored < BitsAllocated) and sign-extends signed values on every image, a copy and two
    passes that cost more than our whole window step. Those only change a value that lies outside the
    BitsStored range, so the view is returned when every value is inside it (the normal case: the min
    and max are one pass) and None otherwise, or for anything else (compressed, big endian, several
    frames or samples, odd bit depths, short pixel data): the caller then asks pydicom. The array is
    read-only; parity with ``pixel_array`` is tested on real and crafted files.
    """
    if (h.transfer_syntax not in NATIVE_SYNTAXES or h.n_frames != 1 or h.bits_allocated not in (8, 16)
            or not h.photometric.startswith("MONOCHROME") or int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or h.pixel_representation not in (0, 1) or not 0 < h.bits_stored <= h.bits_allocated):
        return None
    data = ds.get("PixelData", None)
    data = getattr(data, "value", data)
    nbytes = h.rows * h.columns * h.bits_allocated // 8
    if not isinstance(data, (bytes, bytearray)) or len(data) < nbytes or nbytes == 0:
        return None
    kind = "i" if h.pixel_representation else "u"
    raw = np.frombuffer(data, dtype=f"<{kind}{h.bits_allocated // 8}", count=h.rows * h.columns)
    raw = raw.reshape(h.rows, h.columns)
    if h.bits_stored < h.bits_allocated:
        lo, hi = (-(1 << (h.bits_stored - 1)), (1 << (h.bits_stored - 1)) - 1) if h.pixel_representation \
            else (0, (1 << h.bits_stored) - 1)
        if int(raw.min()) < lo or int(raw.max()) > hi:
            return None
    if not raw.dtype.isnative:
        return None  # a big-endian machine: pydicom swaps the bytes
    return raw


def decode_pixels(ds: Dataset, path: str, h: DicomHeader | None = None) -> np.ndarray:
    """Stored pixel values as pydicom decodes them (sign and unused high bits already handled); with the
    header, native slices are viewed in place (`native_pixels`)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _incomplete(path)
    if h is not None and (raw := native_pixels(ds, h)) is not None:
        return raw
    try:
        return ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoder plugins raise many types; re-raised with the path
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = ts.name if ts is not None else "unknown transfer syntax"
        raise DicomReadError(path, f"cannot decode pixel data ({name}): {type(e).__name__}: {e}") from e


def read_pixels(path: str | Path) -> tuple[DicomHeader, np.ndarray]:
    """(header, stored values) of one file, read in full and decoded."""
    path = str(path)
    with _lenient():
        try:
            with open(path, "rb") as fp:
                ds = _dcmread(fp, path, stop_before_pixels=False)
            try:
                h = header_from_dataset(ds, path)
            except DicomReadError:
                # pydicom returns an empty dataset (with a warning) for a file cut inside encapsulated
                # pixel data; the header-only read tells that apart from a file without UIDs
                raise _incomplete(path) from None
        except OSError as e:
            raise DicomReadError(path, f"cannot open ({e.strerror or e})") from e
        if not h.is_image:
            raise DicomReadError(path, "not an image (no Rows/Columns)")
        raw = decode_pixels(ds, path, h)
    want = (h.rows, h.columns) if h.n_frames == 1 else (h.n_frames, h.rows, h.columns)
    if raw.shape != want:
        raise DicomReadError(path, f"decoded shape {raw.shape} differs from the header's {want}")
    return h, raw


# ----------------------------------------------------------------------------------------- HU


def needs_quirk_fix(h: DicomHeader) -> bool:
    """The RSNA BitsStored-12 quirk: unsigned 12 bit with an intercept above -100.

    Unsigned storage of CT needs an intercept near -1024 to reach air; with one above -100 the stored
    values can only be HU modulo 4096, which is what these slices hold.
    """
    return h.bits_stored == 12 and h.pixel_representation == 0 and h.intercept > -100


def fix_bits_stored_12(raw: np.ndarray) -> np.ndarray:
    """The community fix for quirk slices, as int32: (raw + 1000) wrapped into 0..4095.

    The stored values are HU mod 4096 with intercept 0; adding 1000 and wrapping once at 4096 gives
    HU + 1000 for HU in -1000..3095, so the caller uses intercept -1000. Bits above the 12 stored ones
    carry no pixel data (pydicom already clears them; masked again so any array is safe).
    """
    x = (np.asarray(raw).astype(np.int32) & (QUIRK_MODULUS - 1)) + QUIRK_SHIFT
    x[x >= QUIRK_MODULUS] -= QUIRK_MODULUS
    return x


def rescale_values(h: DicomHeader, original_int: bool = False) -> tuple[float, float]:
    """(slope, intercept); `original_int` truncates both with int() as the original RSNA code did."""
    if original_int:
        return float(int(h.slope)), float(int(h.intercept))
    return h.slope, h.intercept


def stored_values(raw: np.ndarray, h: DicomHeader, *, fix_quirk: bool = True, original_int: bool = False
                  ) -> tuple[np.ndarray, float, float, bool]:
    """(values, slope, intercept, quirk_fixed): the stored values to rescale, with the BitsStored-12 fix
    applied when `needs_quirk_fix` says so (then the values are int32 and the intercept -1000)."""
    slope, intercept = rescale_values(h, original_int)
    fixed = bool(fix_quirk and needs_quirk_fix(h))
    if fixed:
        raw, intercept = fix_bits_stored_12(raw), QUIRK_INTERCEPT
    return np.asarray(raw), slope, intercept, fixed


def hu_values(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """values * slope + intercept in float32 (exact for every 16-bit integer; never uint16 arithmetic).

    The one place the rescale is computed: the table path of `hemorrhage.inputs.slice_image` applies it
    to the range of stored values and must give the same bytes as applying it to every pixel.
    """
    hu = np.asarray(values).astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def to_hu(raw: np.ndarray, h: DicomHeader, *, fix_quirk: bool = True, original_int: bool = False
          ) -> tuple[np.ndarray, bool]:
    """(HU as float32, whether the BitsStored-12 fix was applied) of stored values `raw` of header `h`."""
    values, slope, intercept, fixed = stored_values(raw, h, fix_quirk=fix_quirk, original_int=original_int)
    return hu_values(values, slope, intercept), fixed


def read_hu(path: str | Path, *, fix_quirk: bool = True, original_int: bool = False) -> HUSlice:
    """Header and HU of one file (see `to_hu`)."""
    h, raw = read_pixels(path)
    hu, fixed = to_hu(raw, h, fix_quirk=fix_quirk, original_int=original_int)
    return HUSlice(h, hu, fixed)

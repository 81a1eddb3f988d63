"""Writing synthetic head CT series as DICOM files, with the variety of real archives.

One file per slice (CT Image Storage), written to a temporary name and moved into place. What varies
from series to series, as it does between scanners and sites (`SeriesStyle`):

- how pixels are stored (`PIXEL_FORMATS`): signed 16 bit with intercept -1024 and a circular field of
  view padded with -2000 (GE-like), HU stored directly (intercept 0), unsigned 12 or 16 bit with
  intercept -1024, and the RSNA "BitsStored 12" quirk: unsigned 12 bit, intercept 0, raw = HU mod 4096,
  which only reads correctly after the community fix (raw + 1000, values >= 4096 wrap by 4096,
  intercept -1000);
- transfer syntax: explicit or implicit VR little endian, JPEG 2000 lossless, RLE lossless;
- single or multi-valued WindowCenter/WindowWidth;
- InstanceNumber running up, down, or unrelated to the position of the slice;
- folder layout and file names (random hex, SOPInstanceUID, ``IM`` names), never in slice order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from hemorrhage.classes import SUBTYPES

HU_MIN, HU_MAX = -1024, 3071  # what 12 stored bits with intercept -1024 can hold
QUIRK_MIN, QUIRK_MAX = -1000, 3095  # HU range the BitsStored-12 quirk (and its fix) round-trips
AXIAL = ("ORIGINAL", "PRIMARY", "AXIAL")
LOCALIZER = ("ORIGINAL", "PRIMARY", "LOCALIZER")
LAYOUTS = ("flat", "study_series", "patient_study", "sop_named")
UID_STYLES = ("dicom", "rsna")
SUBTYPE_BIT: dict[str, int] = {s: 1 << i for i, s in enumerate(SUBTYPES)}  # bits of the truth masks


@dataclass(frozen=True)
class PixelFormat:
    name: str
    pixel_representation: int  # 0 unsigned, 1 signed
    bits_stored: int
    intercept: float
    padding: int | None = None  # raw value outside a circular field of view

    @property
    def quirk(self) -> bool:
        return self.name == "quirk12"


PIXEL_FORMATS: dict[str, PixelFormat] = {
    "s16": PixelFormat("s16", 1, 16, -1024.0, -2000),
    "s16_hu": PixelFormat("s16_hu", 1, 16, 0.0, -2000),
    "u12": PixelFormat("u12", 0, 12, -1024.0),
    "u16": PixelFormat("u16", 0, 16, -1024.0),
    "quirk12": PixelFormat("quirk12", 0, 12, 0.0),
}

# (manufacturer, model, kernels, usual pixel format)
SCANNERS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("GE MEDICAL SYSTEMS", "LightSpeed VCT", ("STANDARD", "SOFT"), "s16"),
    ("GE MEDICAL SYSTEMS", "Revolution EVO", ("STANDARD",), "s16"),
    ("SIEMENS", "SOMATOM Definition AS", ("H31s", "J40s"), "u12"),
    ("TOSHIBA", "Aquilion ONE", ("FC26", "FC21"), "u16"),
    ("Philips", "iCT 256", ("UB", "UC"), "u12"),
    ("Hitachi Medical Corporation", "Supria", ("11",), "s16_hu"),
)
SINGLE_WINDOWS = ((40.0, 80.0), (40.0, 80.0), (35.0, 90.0), (30.0, 80.0), (40.0, 120.0))
MULTI_WINDOWS = (((40.0, 80.0), (80.0, 200.0)), ((40.0, 40.0, 40.0), (100.0, 100.0, 200.0)),
                 ((36.0, 600.0), (80.0, 2800.0)))


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is stored; drawn per series by `draw_series_style`."""

    pixel_format: str
    transfer_syntax: str
    window_centre: tuple[float, ...]
    window_width: tuple[float, ...]
    circular_fov: bool
    instance_order: str  # "bottom_up" | "top_down" | "scrambled"
    manufacturer: str
    model: str
    kernel: str

    @property
    def fmt(self) -> PixelFormat:
        return PIXEL_FORMATS[self.pixel_format]

    @property
    def quirk(self) -> bool:
        return self.fmt.quirk

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax in (JPEG2000Lossless, RLELossless)


@dataclass(frozen=True)
class SliceGeometry:
    """Where the slices of a series are, in true position order (index 0 is the most inferior)."""

    orientation: tuple[float, ...]  # ImageOrientationPatient (row direction, column direction)
    positions: np.ndarray  # (D, 3) ImagePositionPatient of each slice, mm
    pixel_spacing: float
    thickness: float
    spacing: float
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, float)
        return np.cross(o[:3], o[3:])


@dataclass(frozen=True)
class StudyHeader:
    study_uid: str
    frame_uid: str
    patient_id: str
    patient_name: str
    patient_sex: str
    patient_age: str
    study_date: str
    study_time: str
    accession: str
    study_id: str


@dataclass(frozen=True)
class SeriesMeta:
    """Everything about an axial series except its pixels."""

    series_uid: str
    series_number: int
    description: str
    geometry: SliceGeometry
    style: SeriesStyle
    sop_uids: tuple[str, ...]  # true position order
    instance_numbers: tuple[int, ...]  # true position order


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the dataset folder
    kind: str  # "axial" | "localizer"
    broken: str  # "" | "truncated" | "no_pixel_data"
    study_uid: str
    series_uid: str
    sop_uid: str
    slice_index: int  # position in the true order; -1 for a localizer


@dataclass
class SyntheticSeries:
    """One axial series in true position order (index 0 = most inferior slice)."""

    meta: SeriesMeta
    kind: str  # "thick" | "thin"
    hu: np.ndarray  # (D, H, W) int16, the true HU
    masks: np.ndarray  # (D, H, W) uint8, bit SUBTYPE_BIT[s] set where subtype s was planted
    labels: np.ndarray  # (D, 6) uint8 in CLASSES order

    def mask(self, subtype: str) -> np.ndarray:
        return (self.masks & SUBTYPE_BIT[subtype]) > 0


@dataclass
class SyntheticLocalizer:
    image_hu: np.ndarray  # (H, W) int16, lateral projection
    pixel_spacing: float
    position: np.ndarray  # ImagePositionPatient of the first pixel
    sop_uid: str
    series_uid: str
    series_number: int
    in_axial_series: bool  # shares the thick series' SeriesInstanceUID (as some archives do)


@dataclass
class SyntheticStudy:
    index: int
    header: StudyHeader
    findings: tuple[str, ...]  # subtypes actually planted
    bleeds: list[dict]
    series: list[SyntheticSeries]
    localizer: SyntheticLocalizer | None = None
    pose: dict = field(default_factory=dict)



# ----------------------------------------------------------------------------------------- drawing


LOCALIZER_SLOT = 3  # series slot of a localizer in its own series (axial series use 0, 1)
MAX_INSTANCES = 1023  # instances per series that RSNA-style ids can number (instance 1023 = localizer)


def _permute(number: int, bits: int, key: str) -> int:
    """A keyed bijection of [0, 2**bits) (4-round Feistel): distinct numbers give distinct ids."""
    half = bits // 2
    mask = (1 << half) - 1
    left, right = number >> half, number & mask
    for r in range(4):
        digest = hashlib.sha256(f"{key}|{r}|{right}".encode()).digest()
        left, right = right, left ^ (int.from_bytes(digest[:8], "big") & mask)
    return (left << half) | right


def make_uid(style: str, seed: int, kind: str, study: int, series: int = 0, instance: int = 0) -> str:
    """Deterministic UID of a study, series or SOP instance ("study" / "series" / "sop" / "frame").

    "dicom": a UID under pydicom's root from a hash of the seed and the path. "rsna": ``ID_`` + hex as in the Kaggle
    data (10 digits for studies and series, 9 for instances), made unique by construction.
    """
    if style != "rsna" or kind == "frame":
        return generate_uid(entropy_srcs=["ct-toolkit synthetic head", str(seed), kind, str(study), str(series),
                                          str(instance)])
    key = f"ct-toolkit synthetic head|{seed}|{kind}"
    if kind == "study":
        return f"ID_{_permute(study, 40, key):010x}"
    if kind == "series":
        return f"ID_{_permute(study * 4 + series, 40, key):010x}"
    if kind == "sop":
        if instance > MAX_INSTANCES or series > LOCALIZER_SLOT or study >= 1 << 24:
            raise ValueError("RSNA-style ids number at most 2**24 studies, 4 series and 1024 instances per series")
        return f"ID_{_permute((study << 12) | (series << 10) | instance, 36, key):09x}"
    raise ValueError(f"unknown uid kind {kind!r}")


def draw_series_style(rng: np.random.Generator, scanner: int, *, j2k_share: float, rle_share: float,
                      multi_window_share: float, quirk_share: float) -> SeriesStyle:
    """Storage of one series from scanner `scanner` (an index into SCANNERS, drawn once per study)."""
    manufacturer, model, kernels, fmt = SCANNERS[scanner]
    if rng.random() < quirk_share:
        fmt = "quirk12"
    elif rng.random() < 0.2:
        fmt = ("s16", "s16_hu", "u12", "u16")[rng.integers(4)]
    r = rng.random()
    if r < j2k_share:
        ts = JPEG2000Lossless
    elif r < j2k_share + rle_share:
        ts = RLELossless
    else:
        ts = ImplicitVRLittleEndian if rng.random() < 0.15 else ExplicitVRLittleEndian
    if rng.random() < multi_window_share:
        wc, ww = MULTI_WINDOWS[rng.integers(len(MULTI_WINDOWS))]
    else:
        c, w = SINGLE_WINDOWS[rng.integers(len(SINGLE_WINDOWS))]
        wc, ww = (c,), (w,)
    order = ("bottom_up", "top_down", "scrambled")[rng.choice(3, p=[0.45, 0.4, 0.15])]
    circular = PIXEL_FORMATS[fmt].padding is not None and rng.random() < 0.7
    return SeriesStyle(fmt, ts, tuple(wc), tuple(ww), bool(circular), order, manufacturer, model,
                       kernels[rng.integers(len(kernels))])


def instance_numbers(order: str, n: int, rng: np.random.Generator) -> tuple[int, ...]:
    """InstanceNumber of each slice in true position order."""
    if order == "bottom_up":
        nums = np.arange(1, n + 1)
    elif order == "top_down":
        nums = np.arange(n, 0, -1)
    else:  # e.g. numbered in acquisition or export order: unrelated to the position
        nums = rng.permutation(n) + 1
    return tuple(int(x) for x in nums)


def draw_study_header(rng: np.random.Generator, seed: int, index: int, uid_style: str) -> StudyHeader:
    day = np.datetime64("2012-01-01") + int(rng.integers(0, 4000))
    hhmmss = f"{rng.integers(0, 24):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    pid = f"SYN{_permute(index, 32, f'patient|{seed}'):08X}"
    return StudyHeader(
        study_uid=make_uid(uid_style, seed, "study", index),
        frame_uid=make_uid("dicom", seed, "frame", index),
        patient_id=pid,
        patient_name=f"SYNTHETIC^HEAD^{index:05d}",
        patient_sex=("M", "F")[rng.integers(2)],
        patient_age=f"{int(rng.integers(18, 96)):03d}Y",
        study_date=str(day).replace("-", ""),
        study_time=f"{hhmmss}.{rng.integers(0, 100):02d}",
        accession=f"{rng.integers(10**7, 10**8)}",
        study_id=str(int(rng.integers(1, 9999))),
    )


# ----------------------------------------------------------------------------------------- pixels


def outside_circle(rows: int, columns: int) -> np.ndarray:
    """Pixels outside the reconstruction circle inscribed in the image."""
    r = (np.arange(rows) - (rows - 1) / 2.0)[:, None]
    c = (np.arange(columns) - (columns - 1) / 2.0)[None, :]
    return r**2 + c**2 > (min(rows, columns) / 2.0) ** 2


def encode_pixels(hu: np.ndarray, style: SeriesStyle) -> np.ndarray:
    """Stored pixel values for integer HU (any shape ending in rows x columns)."""
    fmt = style.fmt
    hu = np.asarray(hu, np.int32)
    if fmt.quirk:
        raw = np.mod(np.clip(hu, QUIRK_MIN, QUIRK_MAX), 4096)
    else:
        raw = np.clip(hu, HU_MIN, HU_MAX) - int(fmt.intercept)
        if style.circular_fov and fmt.padding is not None:
            raw = np.where(outside_circle(*hu.shape[-2:]), fmt.padding, raw)
    return raw.astype(np.int16 if fmt.pixel_representation else np.uint16)


def expected_hu(hu: np.ndarray, style: SeriesStyle) -> np.ndarray:
    """HU that a correct reader gets from the files (with the quirk fix applied where needed)."""
    raw = encode_pixels(hu, style).astype(np.int32)
    if style.quirk:
        return quirk_fix(raw) - 1000
    return raw + int(style.fmt.intercept)


def quirk_fix(raw: np.ndarray) -> np.ndarray:
    """The community fix for BitsStored-12 slices: raw + 1000, wrapping at 4096 (then intercept -1000)."""
    x = np.asarray(raw, np.int32) + 1000
    return np.where(x >= 4096, x - 4096, x)


# ----------------------------------------------------------------------------------------- datasets


def _ds(value: float, digits: int = 6) -> str:
    s = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _base_dataset(header: StudyHeader, series_uid: str, series_number: int, description: str,
                  sop_uid: str, transfer_syntax: str, image_type: tuple[str, ...]) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CTTOOLKIT_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = header.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = header.study_time
    ds.AccessionNumber = header.accession
    ds.Modality = "CT"
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = description
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = header.patient_sex
    ds.PatientAge = header.patient_age
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "HEAD"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = header.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = header.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _set_pixels(ds: Dataset, raw: np.ndarray, fmt: PixelFormat, transfer_syntax: str) -> None:
    ds.Rows, ds.Columns = raw.shape
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = fmt.pixel_representation
    ds.RescaleIntercept = _ds(fmt.intercept)
    if transfer_syntax in (JPEG2000Lossless, RLELossless):
        ds.compress(transfer_syntax, np.ascontiguousarray(raw), generate_instance_uid=False)
    else:
        ds.PixelData = np.ascontiguousarray(raw).tobytes()


def axial_slice_dataset(header: StudyHeader, meta: SeriesMeta, k: int, raw: np.ndarray) -> Dataset:
    """The dataset of slice k (true position order) of an axial series."""
    g, st = meta.geometry, meta.style
    ds = _base_dataset(header, meta.series_uid, meta.series_number, meta.description, meta.sop_uids[k],
                       st.transfer_syntax, AXIAL)
    ds.Manufacturer = st.manufacturer
    ds.ManufacturerModelName = st.model
    ds.SliceThickness = _ds(g.thickness, 3)
    ds.SpacingBetweenSlices = _ds(g.spacing, 3)
    ds.DataCollectionDiameter = "320"
    ds.ReconstructionDiameter = _ds(g.pixel_spacing * g.columns, 2)
    ds.GantryDetectorTilt = _ds(float(np.degrees(np.arcsin(g.orientation[5]))), 2)  # sign as real scanners write it
    ds.ConvolutionKernel = st.kernel
    ds.InstanceNumber = meta.instance_numbers[k]
    pos = g.positions[k]
    ds.ImagePositionPatient = [_ds(v, 4) for v in pos]
    ds.ImageOrientationPatient = [_ds(v, 6) for v in g.orientation]
    ds.SliceLocation = _ds(pos[2], 4)
    ds.PixelSpacing = [_ds(g.pixel_spacing, 6)] * 2
    if st.circular_fov and st.fmt.padding is not None:
        ds.PixelPaddingValue = st.fmt.padding
    ds.WindowCenter = [_ds(v) for v in st.window_centre] if len(st.window_centre) > 1 else _ds(st.window_centre[0])
    ds.WindowWidth = [_ds(v) for v in st.window_width] if len(st.window_width) > 1 else _ds(st.window_width[0])
    _set_pixels(ds, raw, st.fmt, st.transfer_syntax)
    return ds


def localizer_dataset(header: StudyHeader, series_uid: str, series_number: int, sop_uid: str,
                      image_hu: np.ndarray, pixel_spacing: float, position: np.ndarray,
                      manufacturer: str = "") -> Dataset:
    """A lateral scout: ImageType LOCALIZER, sagittal orientation, unsigned 16 bit, intercept -1024."""
    ds = _base_dataset(header, series_uid, series_number, "Topogram", sop_uid, ExplicitVRLittleEndian, LOCALIZER)
    ds.Manufacturer = manufacturer
    ds.InstanceNumber = 0
    ds.ImagePositionPatient = [_ds(v, 4) for v in position]
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.PixelSpacing = [_ds(pixel_spacing, 6)] * 2
    ds.WindowCenter, ds.WindowWidth = "0", "2000"
    raw = (np.clip(np.asarray(image_hu, np.int32), HU_MIN, HU_MAX) + 1024).astype(np.uint16)
    _set_pixels(ds, raw, PIXEL_FORMATS["u16"], ExplicitVRLittleEndian)
    return ds


def lenient(uids: tuple[str, ...] | list[str]) -> contextlib.AbstractContextManager:
    """RSNA-style UIDs (``ID_...``) are not valid DICOM UIDs: skip pydicom's value checks for them."""
    if any(u.startswith("ID_") for u in uids):
        return pydicom.config.disable_value_validation()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- files


def dataset_bytes(ds: Dataset, broken: str = "", rng: np.random.Generator | None = None) -> bytes:
    """Serialise a dataset; broken="truncated" cuts the file short, "no_pixel_data" drops the pixels."""
    if broken == "no_pixel_data":
        del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if broken == "truncated":
        if rng is None:
            raise ValueError("truncating a file needs an rng")
        data = data[: int(len(data) * rng.uniform(0.3, 0.8))]
    elif broken not in ("", "no_pixel_data"):
        raise ValueError(f"unknown kind of broken file {broken!r}")
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name in the same folder, then rename: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def assign_paths(rng: np.random.Generator, layout: str, header: StudyHeader,
                 series: list[tuple[str, list[str]]], used: set[str]) -> dict[str, str]:
    """File path (relative to the dicom folder) of every SOP instance, by layout; never in slice order.

    `series` is a list of (SeriesInstanceUID, SOPInstanceUIDs); `used` collects paths across studies.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    study_dir = rng.bytes(4).hex()
    out: dict[str, str] = {}
    for _series_uid, sops in series:
        series_dir = rng.bytes(4).hex()
        for sop in rng.permutation(np.array(sops, dtype=object)):
            while True:
                if layout == "flat":
                    rel = f"{rng.bytes(8).hex()}.dcm"
                elif layout == "study_series":
                    rel = f"{study_dir}/{series_dir}/{rng.bytes(6).hex()}.dcm"
                elif layout == "patient_study":
                    rel = f"{header.patient_id}/{header.study_date}_{study_dir[:6]}/IM{rng.bytes(4).hex().upper()}"
                else:
                    rel = f"{study_dir}/{sop}.dcm"
                if rel not in used:
                    break
                if layout == "sop_named":
                    raise ValueError(f"duplicate SOPInstanceUID {sop}")
            used.add(rel)
            out[str(sop)] = rel
    return out


@contextlib.contextmanager
def _quiet_encoders():
    """pylibjpeg-openjpeg logs one INFO line per encoded tile; keep it to warnings while writing."""
    lg = logging.getLogger("openjpeg")
    level = lg.level
    lg.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        lg.setLevel(level)


def write_study_files(study: SyntheticStudy, out_dir: Path, seed: int, broken: list[str],
                      used: set[str]) -> list[FileRecord]:
    """Write every file of a study under ``out_dir/dicom``; `broken` lists kinds of broken files to make.

    Broken files replace inner slices of the thick series. Names, layout and the broken slices come
    from their own random stream, so they do not change the pixels.
    """
    rng = np.random.default_rng([seed, study.index, 0x46494C45])
    layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    entries = [(s.meta.series_uid, list(s.meta.sop_uids)) for s in study.series]
    loc = study.localizer
    if loc is not None:
        if loc.in_axial_series:
            entries[0][1].append(loc.sop_uid)
        else:
            entries.append((loc.series_uid, [loc.sop_uid]))
    paths = assign_paths(rng, layout, study.header, entries, used)
    broken_at: dict[int, str] = {}
    if broken:
        n = len(study.series[0].meta.sop_uids)
        if len(broken) > n - 2:
            raise ValueError(f"study {study.index}: cannot break {len(broken)} of {n} slices")
        ks = rng.choice(np.arange(1, n - 1), size=len(broken), replace=False)
        broken_at = {int(k): kind for k, kind in zip(ks, broken, strict=True)}
    with _quiet_encoders():
        return _write_files(study, out_dir, paths, broken_at, rng)


def _write_files(study: SyntheticStudy, out_dir: Path, paths: dict[str, str], broken_at: dict[int, str],
                 rng: np.random.Generator) -> list[FileRecord]:
    records: list[FileRecord] = []
    h, loc = study.header, study.localizer
    for j, s in enumerate(study.series):
        raw = encode_pixels(s.hu, s.meta.style)
        with lenient([h.study_uid, s.meta.series_uid, *s.meta.sop_uids]):
            for k, sop in enumerate(s.meta.sop_uids):
                kind = broken_at.get(k, "") if j == 0 else ""
                ds = axial_slice_dataset(h, s.meta, k, raw[k])
                rel = f"dicom/{paths[sop]}"
                write_atomic(out_dir / rel, dataset_bytes(ds, kind, rng))
                records.append(FileRecord(rel, "axial", kind, h.study_uid, s.meta.series_uid, sop, k))
    if loc is not None:
        with lenient([h.study_uid, loc.series_uid, loc.sop_uid]):
            ds = localizer_dataset(h, loc.series_uid, loc.series_number, loc.sop_uid, loc.image_hu,
                                   loc.pixel_spacing, loc.position, study.series[0].meta.style.manufacturer)
            rel = f"dicom/{paths[loc.sop_uid]}"
            write_atomic(out_dir / rel, dataset_bytes(ds))
        records.append(FileRecord(rel, "localizer", "", h.study_uid, loc.series_uid, loc.sop_uid, -1))
    return records

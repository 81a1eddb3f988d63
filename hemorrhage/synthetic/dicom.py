"""Writing synthetic head CT studies as DICOM files, with the folder layouts and broken files of real archives.

One file per slice (CT Image Storage), written to a temporary name and moved into place. The datasets
carry the study header and the series' storage style (`synthetic_style`); folder layout and file names
vary by study (random hex, SOPInstanceUID, ``IM`` names), never in slice order; some inner slices can be
written broken (truncated, or without pixel data).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from ctcore.atomic import atomic_write
from hemorrhage.synthetic.header import StudyHeader
from hemorrhage.synthetic.series import SeriesMeta, SyntheticStudy
from hemorrhage.synthetic.style import HU_MAX, HU_MIN, PIXEL_FORMATS, PixelFormat, encode_pixels

AXIAL = ("ORIGINAL", "PRIMARY", "AXIAL")
LOCALIZER = ("ORIGINAL", "PRIMARY", "LOCALIZER")
LAYOUTS = ("flat", "study_series", "patient_study", "sop_named")


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the dataset folder
    kind: str  # "axial" | "localizer"
    broken: str  # "" | "truncated" | "no_pixel_data"
    study_uid: str
    series_uid: str
    sop_uid: str
    slice_index: int  # position in the true order; -1 for a localizer


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
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


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

"""Metadata rows of the synthetic CT-RATE tables: the 44 columns of CT-RATE's metadata CSVs, a scanner
drawn per patient, and one row per volume with its geometry read from the volume's own affine.
"""

from __future__ import annotations

import datetime as dt

import numpy as np


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# CT-RATE metadata columns, in the order of the released validation_metadata.csv (44 columns)
METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "Manufacturer",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientSex",
    "PatientAge",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "PatientPosition",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient",
    "ExposureModulationType",
    "CTDIvol",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "XYSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "NumberofSlices",
    "ZSpacing",
    "StudyDate",
)

SCANNERS = {  # manufacturer -> models, kernels (standard, sharp, soft), filter, source distances
    "Philips": (("iCT 256", "Ingenuity CT", "Brilliance 64"), ("B", "YA", "A"), "B", ("", "")),
    "SIEMENS": (
        ("SOMATOM Definition Edge", "SOMATOM go.Top"),
        ("Br40d", "Bl57d", "Br36d"),
        "FLAT",
        (1085.6, 595.0),
    ),
    "GE MEDICAL SYSTEMS": (
        ("Revolution EVO", "Optima CT660"),
        ("STANDARD", "LUNG", "SOFT"),
        "BODY FILTER",
        (946.7, 541.0),
    ),
    "TOSHIBA": (("Aquilion ONE",), ("FC08", "FC52", "FC03"), "LARGE", (1072.0, 600.0)),
}
SERIES = {"standard": "THORAX", "sharp": "HRCT LUNG", "soft": "THORAX SOFT TISSUE"}


def draw_scanner(rng: np.random.Generator) -> dict:
    maker = str(_pick(rng, tuple(SCANNERS)))
    models, kernels, filt, (sdd, sdp) = SCANNERS[maker]
    pitch = float(rng.choice([0.8, 0.9, 1.0, 1.2, 1.4]))
    return {
        "Manufacturer": maker,
        "ManufacturerModelName": _pick(rng, models),
        "kernels": kernels,
        "FilterType": filt,
        "DistanceSourceToDetector": sdd,
        "DistanceSourceToPatient": sdp,
        "TableHeight": round(float(rng.uniform(110, 190)), 1),
        "ExposureTime": int(rng.integers(300, 1000)),
        "XRayTubeCurrent": int(rng.integers(80, 350)),
        "Exposure": int(rng.integers(40, 250)),
        "RevolutionTime": float(rng.choice([0.33, 0.5, 0.75])),
        "SpiralPitchFactor": pitch,
        "CTDIvol": round(float(rng.uniform(3.0, 14.0)), 6),
        "ExposureModulationType": _pick(rng, ("Z DOM", "XYZ_EC", "NONE", "")),
    }


def _lps(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=float) * [-1.0, -1.0, 1.0]


def _vec(v) -> str:
    return "[" + ", ".join(f"{float(x) + 0.0:.10g}" for x in v) + "]"  # + 0.0: no "-0"


def metadata_row(
    name: str,
    patient: dict,
    scanner: dict,
    kernel: str,
    affine: np.ndarray,
    shape: tuple[int, ...],
    intercept: int,
    study_date: dt.date,
) -> dict:
    """One metadata row for a volume as stored on disk (geometry from its affine, DICOM LPS)."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    ipp = _lps(affine[:3, 3])
    iop = np.concatenate([_lps(affine[:3, 0] / sp[0]), _lps(affine[:3, 1] / sp[1])])
    centre = _lps(affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3])
    xy = float(sp[0])
    k = ("standard", "sharp", "soft").index(kernel)
    return {
        "VolumeName": name,
        "Manufacturer": scanner["Manufacturer"],
        "SeriesDescription": SERIES[kernel],
        "ManufacturerModelName": scanner["ManufacturerModelName"],
        "PatientSex": patient["sex"],
        "PatientAge": f"{patient['age']:03d}Y",
        "ReconstructionDiameter": round(xy * max(shape[:2]), 2),
        "DistanceSourceToDetector": scanner["DistanceSourceToDetector"],
        "DistanceSourceToPatient": scanner["DistanceSourceToPatient"],
        "GantryDetectorTilt": 0,
        "TableHeight": scanner["TableHeight"],
        "RotationDirection": "CW",
        "ExposureTime": scanner["ExposureTime"],
        "XRayTubeCurrent": scanner["XRayTubeCurrent"],
        "Exposure": scanner["Exposure"],
        "FilterType": scanner["FilterType"],
        "GeneratorPower": "",
        "FocalSpots": "",
        "ConvolutionKernel": scanner["kernels"][k],
        "PatientPosition": "HFS",
        "RevolutionTime": scanner["RevolutionTime"],
        "SingleCollimationWidth": 0.625,
        "TotalCollimationWidth": 40.0,
        "TableSpeed": round(40.0 * scanner["SpiralPitchFactor"] / scanner["RevolutionTime"], 3),
        "TableFeedPerRotation": round(40.0 * scanner["SpiralPitchFactor"], 3),
        "SpiralPitchFactor": scanner["SpiralPitchFactor"],
        "DataCollectionCenterPatient": _vec(np.round(centre, 4)),
        "ReconstructionTargetCenterPatient": _vec(np.round(centre, 4)),
        "ExposureModulationType": scanner["ExposureModulationType"],
        "CTDIvol": scanner["CTDIvol"],
        "ImagePositionPatient": _vec(np.round(ipp, 5)),
        "ImageOrientationPatient": _vec(np.round(iop, 6)),
        "SliceLocation": round(float(ipp[2]), 5),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": int(shape[1]),
        "Columns": int(shape[0]),
        "XYSpacing": _vec([xy, float(sp[1])]),
        "RescaleIntercept": intercept,
        "RescaleSlope": 1,
        "RescaleType": "",
        "NumberofSlices": int(shape[2]),
        "ZSpacing": float(round(sp[2], 6)),
        "StudyDate": study_date.strftime("%Y%m%d"),
    }

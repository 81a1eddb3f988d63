"""Identity of a synthetic head CT study: deterministic UIDs (DICOM or RSNA style) and the study header.

UIDs depend only on the seed and the study / series / instance numbers, so the same configuration
always names the same files; "rsna" ids (``ID_`` + hex, as in the Kaggle data) are unique by
construction (a keyed bijection), which is why they number at most `MAX_INSTANCES` per series.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from pydicom.uid import generate_uid

UID_STYLES = ("dicom", "rsna")
LOCALIZER_SLOT = 3  # series slot of a localizer in its own series (axial series use 0, 1)
MAX_INSTANCES = 1023  # instances per series that RSNA-style ids can number (instance 1023 = localizer)


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
        # one joined source: pydicom concatenates the sources without a separator, so (study 1, series 1,
        # instance 11) and (study 11, series 1, instance 1) would share a UID
        parts = ["ct-toolkit synthetic head", str(seed), kind, str(study), str(series), str(instance)]
        return generate_uid(entropy_srcs=["|".join(parts)])
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

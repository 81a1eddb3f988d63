"""A synthetic head CT study in memory: slice geometry, series metadata, true HU, truth masks and labels.

`hemorrhage.synthetic.study.synthesize_study` makes one; `hemorrhage.synthetic.dicom` writes it as files.
Series are in true position order: index 0 is the most inferior slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hemorrhage.classes import SUBTYPES
from hemorrhage.synthetic.header import StudyHeader
from hemorrhage.synthetic.style import SeriesStyle

SUBTYPE_BIT: dict[str, int] = {s: 1 << i for i, s in enumerate(SUBTYPES)}  # bits of the truth masks


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
class SeriesMeta:
    """Everything about an axial series except its pixels."""

    series_uid: str
    series_number: int
    description: str
    geometry: SliceGeometry
    style: SeriesStyle
    sop_uids: tuple[str, ...]  # true position order
    instance_numbers: tuple[int, ...]  # true position order


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

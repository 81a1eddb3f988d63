"""Settings of a synthetic head CT dataset (`HeadSynthConfig`) and their checks (`validate_config`).

`hemorrhage.synthetic.head` documents what the dataset holds; shares are per series unless said otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ctcore.schema import arg
from hemorrhage.classes import SUBTYPES
from hemorrhage.synthetic.header import MAX_INSTANCES, UID_STYLES


@dataclass
class HeadSynthConfig:
    """What `generate_head_dataset` makes. Shares are per series unless said otherwise."""

    out_dir: Path = arg(Path("synthetic_head"), required=True,
                        help="output folder (must be empty or absent unless --overwrite)")
    n_studies: int = arg(8, help="number of studies")
    size: int = arg(256, help="rows = columns of the axial images (e.g. 512 or 128)")
    slices: int = arg(32, help="slices of the thick series per study (at most; see --slices_jitter)")
    seed: int = arg(0, help="random seed")
    # files written broken (truncated / without pixel data), left out of labels.csv
    broken: int = arg(0, help="number of deliberately broken files (truncated / no pixel data), listed in "
                              "broken.csv")
    overwrite: bool = arg(False, help="replace the synthetic dataset already in out_dir")
    slice_mm: float = arg(5.0, help="spacing and thickness of the thick series, mm")
    thin_mm: float = arg(2.5, help="same for the thin series, mm")
    thin_share: float = arg(0.25, help="share of studies with a second, thin series")
    slices_jitter: float = arg(0.2, help="a study has between slices*(1-jitter) and slices thick slices")
    # reconstruction diameter (in-plane field of view) drawn per study
    fov_min_mm: float = arg(220.0, help="smallest in-plane field of view, mm")
    fov_max_mm: float = arg(250.0, help="largest in-plane field of view, mm")
    normal_share: float = arg(0.3, help="share of studies without hemorrhage")
    p_epidural: float = arg(0.25, help="probability of epidural in a study that is not normal")
    p_intraparenchymal: float = arg(0.25, help="probability of intraparenchymal in a study that is not normal")
    p_intraventricular: float = arg(0.25, help="probability of intraventricular in a study that is not normal")
    p_subarachnoid: float = arg(0.25, help="probability of subarachnoid in a study that is not normal")
    p_subdural: float = arg(0.25, help="probability of subdural in a study that is not normal")
    j2k_share: float = arg(0.15, help="share of series stored as JPEG 2000 lossless")
    rle_share: float = arg(0.15, help="share stored as RLE lossless")
    multi_window_share: float = arg(0.3, help="share of series with multi-valued WindowCenter/WindowWidth")
    quirk_share: float = arg(0.1, help="share of series with the BitsStored-12 / intercept-0 quirk")
    localizer_share: float = arg(0.3, help="share of studies with a localizer image (0 = none)")
    tilt_share: float = arg(0.15, help="share of series with gantry tilt")  # oblique ImageOrientationPatient
    uid_style: str = arg("dicom", choices=UID_STYLES, help="dicom (proper UIDs) or rsna (ID_ + hex)")
    min_label_mm2: float = arg(10.0, help="planted area on a slice from which the slice is labelled, mm^2")

    def probabilities(self) -> dict[str, float]:
        return {s: float(getattr(self, f"p_{s}")) for s in SUBTYPES}


def validate_config(cfg: HeadSynthConfig) -> None:
    """Raise ValueError naming the first nonsensical setting."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"HeadSynthConfig: {msg}")

    need(isinstance(cfg.n_studies, int) and cfg.n_studies >= 1, f"n_studies must be >= 1, got {cfg.n_studies}")
    need(isinstance(cfg.size, int) and 32 <= cfg.size <= 2048, f"size must be 32..2048 pixels, got {cfg.size}")
    need(isinstance(cfg.slices, int) and 3 <= cfg.slices <= 1024, f"slices must be 3..1024, got {cfg.slices}")
    need(isinstance(cfg.seed, int) and cfg.seed >= 0, f"seed must be a non-negative integer, got {cfg.seed}")
    need(0.3 <= cfg.slice_mm <= 20, f"slice_mm must be 0.3..20 mm, got {cfg.slice_mm}")
    need(0.3 <= cfg.thin_mm <= 20, f"thin_mm must be 0.3..20 mm, got {cfg.thin_mm}")
    need(100 <= cfg.fov_min_mm <= cfg.fov_max_mm <= 500,
         f"need 100 <= fov_min_mm <= fov_max_mm <= 500, got {cfg.fov_min_mm}, {cfg.fov_max_mm}")
    need(0.0 <= cfg.slices_jitter < 1.0, f"slices_jitter must be in [0, 1), got {cfg.slices_jitter}")
    need(cfg.min_label_mm2 >= 0, f"min_label_mm2 must be >= 0, got {cfg.min_label_mm2}")
    need(cfg.uid_style in UID_STYLES, f"uid_style must be one of {UID_STYLES}, got {cfg.uid_style!r}")
    shares = ["thin_share", "normal_share", "j2k_share", "rle_share", "multi_window_share", "quirk_share",
              "localizer_share", "tilt_share"] + [f"p_{s}" for s in SUBTYPES]
    for name in shares:
        v = getattr(cfg, name)
        need(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, f"{name} must be a probability in [0, 1], got {v}")
    need(cfg.j2k_share + cfg.rle_share <= 1.0, "j2k_share + rle_share must be <= 1")
    if cfg.uid_style == "rsna":
        thin = cfg.thin_mm if cfg.thin_mm < cfg.slice_mm else cfg.slice_mm / 2.0
        most = cfg.slices * max(1.0, cfg.slice_mm / thin if cfg.thin_share > 0 else 1.0)
        need(most <= MAX_INSTANCES and cfg.n_studies < 1 << 24,
             f"uid_style rsna numbers at most {MAX_INSTANCES} slices per series and 2**24 studies")
    need(isinstance(cfg.broken, int) and cfg.broken >= 0, f"broken must be >= 0, got {cfg.broken}")
    per_study = max(0, min_thick_slices(cfg) - 2)
    need(cfg.broken <= cfg.n_studies * per_study,
         f"broken={cfg.broken} is more than the {cfg.n_studies * per_study} slices that can be broken "
         f"({per_study} inner slices of each of {cfg.n_studies} thick series)")


def min_thick_slices(cfg: HeadSynthConfig) -> int:
    return max(3, math.ceil(cfg.slices * (1.0 - cfg.slices_jitter)))

"""A PNG of planted hemorrhages read back from the synthetic DICOM files, with their outlines.

Reads the files with pydicom exactly as a user would (slope/intercept, plus the community fix for
BitsStored-12 slices), so the figure shows what is on disk, not what was meant to be written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from ctcore.montage import Panel, save_montage
from ctcore.schema import arg
from hemorrhage.classes import SUBTYPES
from hemorrhage.synthetic.config import HeadSynthConfig
from hemorrhage.synthetic.head import HeadDatasetSummary, generate_head_dataset, read_truth
from hemorrhage.synthetic.style import quirk_fix

EXTRA_AXIAL = ("epidural", "subdural")
BRAIN_WINDOW, SUBDURAL_WINDOW = (40.0, 80.0), (80.0, 200.0)


def needs_quirk_fix(ds: pydicom.Dataset) -> bool:
    """The RSNA BitsStored-12 quirk: unsigned 12 bit with an intercept above -100."""
    return (int(ds.get("BitsStored", 16)) == 12 and int(ds.get("PixelRepresentation", 0)) == 0
            and float(ds.get("RescaleIntercept", 0)) > -100)


def read_slice_hu(path: str | Path) -> np.ndarray:
    """HU of one slice: raw * slope + intercept, with the quirk fix where the header calls for it."""
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.int32)
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    if needs_quirk_fix(ds):
        raw, intercept = quirk_fix(raw), -1000.0
    return (raw * slope + intercept).astype(np.float32)


def _positive_series(out_dir: Path, n_studies: int) -> list[dict]:
    """Truth of up to n_studies series with findings, one per study, thick series first."""
    truths = [read_truth(p) for p in sorted((out_dir / "truth").glob("*.npz"))]
    truths.sort(key=lambda t: (t["kind"] != "thick", str(t["study_uid"])))
    chosen: dict[str, dict] = {}
    for t in truths:
        ok = t["broken"] == ""
        if t["study_uid"] not in chosen and t["labels"][ok, 0].any():
            chosen[str(t["study_uid"])] = t
    return list(chosen.values())[:n_studies]


def head_montage_panels(out_dir: str | Path, n_studies: int = 4) -> list[Panel]:
    """For each of a few positive series, per planted subtype the slice with the most planted voxels."""
    out_dir = Path(out_dir)
    panels: list[Panel] = []
    for t in _positive_series(out_dir, n_studies):
        masks, ok = t["masks"], t["broken"] == ""
        for bit, name in zip(t["subtype_bits"], t["subtypes"], strict=True):
            area = ((masks & bit) > 0).sum(axis=(1, 2)) * ok
            if area.max() == 0:
                continue
            k = int(np.argmax(area))
            image = read_slice_hu(out_dir / str(t["paths"][k]))
            regions = {str(s): (masks[k] & b) > 0 for b, s in zip(t["subtype_bits"], t["subtypes"], strict=True)}
            window = SUBDURAL_WINDOW if name in EXTRA_AXIAL else BRAIN_WINDOW
            title = f"{str(t['series_uid'])[-8:]} {name} slice {k + 1}/{len(masks)}"
            panels.append(Panel(image, title, window, {s: m for s, m in regions.items() if m.any()}))
    return panels


def save_head_montage(out_dir: str | Path, png_path: str | Path, n_studies: int = 4) -> Path:
    """Draw planted bleeds of up to `n_studies` positive series of a synthetic dataset into a PNG."""
    panels = head_montage_panels(out_dir, n_studies)
    if not panels:
        raise ValueError(f"{out_dir}: no series with a planted hemorrhage to draw")
    return save_montage(panels, png_path, ncols=4,
                        suptitle=f"synthetic head CT, planted hemorrhages ({', '.join(SUBTYPES)})")


@dataclass
class HeadMontageConfig:
    """scripts/hemorrhage_make_synthetic.py's setting beside HeadSynthConfig."""

    montage: Path | None = arg(None, help="also draw a PNG of a few planted bleeds")


def make_head_dataset(cfg: HeadSynthConfig, extra: HeadMontageConfig) -> HeadDatasetSummary:
    """generate_head_dataset, then the montage PNG when asked for (the script's job)."""
    summary = generate_head_dataset(cfg)
    if extra.montage is not None:
        save_head_montage(cfg.out_dir, extra.montage)
        logging.getLogger(__name__).info("montage: %s", extra.montage)
    return summary

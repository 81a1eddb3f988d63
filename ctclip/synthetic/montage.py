"""A PNG of planted findings in a synthetic CT-RATE set, read back from disk the way a user would.

Volumes go through the same steps a loader must take: nibabel -> closest canonical (RAS) -> HU from
the metadata CSV for the `raw` variant (stored values are already HU for `hu`). Each panel is the
axial slice with the most voxels of one planted finding, in radiological display (patient's right on
the left of the image, anterior at the top), cropped around the finding, with every finding's outline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctclip.findings import FINDINGS
from ctclip.synthetic.chest import SynthSummary, generate_chest_dataset
from ctclip.synthetic.config import ChestSynthConfig
from ctclip.synthetic.files import INFO_FILE, SPLITS, load_finding_masks, volume_path
from ctcore.schema import arg

# display windows as (centre, width) in HU: the lung window for what changes the lung, a narrow lung window
# for the subtle density differences of emphysema and mosaic attenuation, the soft-tissue window for
# fluid, nodes and the hernia, a heart window for the enhanced heart, and a bone window for calcium and metal
LUNG_WINDOW, SOFT_WINDOW, HEART_WINDOW, DENSE_WINDOW = (
    (-600.0, 1500.0),
    (40.0, 400.0),
    (150.0, 900.0),
    (400.0, 1800.0),
)
NARROW_LUNG_WINDOW = (-750.0, 700.0)
WINDOWS = {
    "Medical material": DENSE_WINDOW,
    "Arterial wall calcification": DENSE_WINDOW,
    "Cardiomegaly": HEART_WINDOW,
    "Pericardial effusion": SOFT_WINDOW,
    "Coronary artery wall calcification": DENSE_WINDOW,
    "Hiatal hernia": SOFT_WINDOW,
    "Lymphadenopathy": SOFT_WINDOW,
    "Emphysema": (-800.0, 500.0),
    "Atelectasis": SOFT_WINDOW,
    "Lung nodule": LUNG_WINDOW,
    "Lung opacity": LUNG_WINDOW,
    "Pulmonary fibrotic sequela": LUNG_WINDOW,
    "Pleural effusion": SOFT_WINDOW,
    "Mosaic attenuation pattern": NARROW_LUNG_WINDOW,
    "Peribronchial thickening": LUNG_WINDOW,
    "Consolidation": LUNG_WINDOW,
    "Bronchiectasis": LUNG_WINDOW,
    "Interlobular septal thickening": LUNG_WINDOW,
}


def read_tables(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels and metadata of both splits (one row per volume)."""
    labels = pd.concat([pd.read_csv(out_dir / f[2]) for f in SPLITS.values()], ignore_index=True)
    meta = pd.concat([pd.read_csv(out_dir / f[0]) for f in SPLITS.values()], ignore_index=True)
    return labels, meta


def load_hu(out_dir: Path, name: str, meta_row: pd.Series, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(HU in RAS as float32, affine) of one synthetic volume, rescaled per the storage variant."""
    img = nib.as_closest_canonical(nib.load(volume_path(out_dir, name)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if variant == "raw":
        data = data * float(meta_row["RescaleSlope"]) + float(meta_row["RescaleIntercept"])
    return data, img.affine


def canonical_masks(out_dir: Path, name: str) -> dict[str, np.ndarray]:
    path = out_dir / "masks" / name
    ornt = nib.orientations
    img = nib.load(path)
    tr = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.axcodes2ornt(("R", "A", "S")))
    return {k: ornt.apply_orientation(m, tr) for k, m in load_finding_masks(path).items() if m.any()}


def _pick_volumes(labels: pd.DataFrame, n: int) -> list[str]:
    """Greedy: each next volume (one per scan) adds the most findings not shown yet."""
    table = labels.set_index("VolumeName")[list(FINDINGS)]
    positives = {str(v): {f for f in FINDINGS if int(row[f]) == 1} for v, row in table.iterrows()}
    scan = lambda v: v.rsplit("_", 1)[0]  # noqa: E731  reconstructions of a scan look alike
    chosen: list[str] = []
    shown: set[str] = set()
    for _ in range(n):
        left = [v for v in positives if scan(v) not in {scan(c) for c in chosen}]
        best = max(left, key=lambda v: (len(positives[v] - shown), len(positives[v])), default=None)
        if best is None or not positives[best]:
            break
        chosen.append(best)
        shown |= positives[best]
    return chosen


def _crop(shape: tuple[int, int], mask2d: np.ndarray, spacing: float) -> tuple[slice, slice]:
    xs, ys = np.flatnonzero(mask2d.any(axis=1)), np.flatnonzero(mask2d.any(axis=0))
    half = int(max(xs[-1] - xs[0], ys[-1] - ys[0]) / 2 + 25.0 / spacing)
    half = max(half, int(45.0 / spacing), int(0.3 * min(shape)))
    if 2 * half >= 0.7 * min(shape):
        return slice(None), slice(None)
    cx, cy = (xs[0] + xs[-1]) // 2, (ys[0] + ys[-1]) // 2
    x0, y0 = int(np.clip(cx - half, 0, shape[0] - 2 * half)), int(np.clip(cy - half, 0, shape[1] - 2 * half))
    return slice(x0, x0 + 2 * half), slice(y0, y0 + 2 * half)


def _display(slice_xy: np.ndarray, crop: tuple[slice, slice]) -> np.ndarray:
    """RAS (x, y) slice -> radiological display: anterior at the top, the patient's right on the left."""
    return slice_xy[crop].T[::-1, ::-1]


def save_chest_montage(
    out_dir: str | Path, png_path: str | Path, n_volumes: int = 4, per_volume: int = 4
) -> Path:
    """Draw up to `per_volume` findings of each of `n_volumes` volumes chosen to cover many findings."""
    from ctcore.montage import Panel, save_montage

    out_dir = Path(out_dir)
    variant = json.loads((out_dir / INFO_FILE).read_text())["variant"]
    labels, meta = read_tables(out_dir)
    meta = meta.set_index("VolumeName")
    panels = []
    shown: set[str] = set()
    for name in _pick_volumes(labels, n_volumes):
        hu, affine = load_hu(out_dir, name, meta.loc[name], variant)
        masks = canonical_masks(out_dir, name)
        order = sorted(masks, key=lambda f: (f in shown, FINDINGS.index(f)))
        used: list[int] = []
        for finding in order:
            z = int(np.argmax(masks[finding].sum(axis=(0, 1))))
            if len(used) == per_volume or any(abs(z - u) <= 1 for u in used):
                continue  # one panel per slice: its outlines show the other findings there too
            used.append(z)
            crop = _crop(hu.shape[:2], masks[finding][:, :, z], float(abs(affine[0, 0])))
            regions = {f: _display(m[:, :, z], crop) for f, m in masks.items() if m[:, :, z][crop].any()}
            shown.update(regions)
            title = f"{name.removesuffix('.nii.gz')}: {finding} (z={z})"
            window = WINDOWS.get(finding, SOFT_WINDOW)
            panels.append(Panel(_display(hu[:, :, z], crop), title, window, regions))
    if not panels:
        raise ValueError(f"{out_dir}: no volume has a planted finding to draw")
    return save_montage(
        panels, png_path, ncols=4, suptitle=f"synthetic CT-RATE ({variant} variant): planted findings"
    )


@dataclass
class ChestMontageConfig:
    """scripts/ctclip_make_synthetic.py's setting beside ChestSynthConfig."""

    montage: Path | None = arg(None, help="also save a PNG of planted findings here")


def make_chest_dataset(cfg: ChestSynthConfig, extra: ChestMontageConfig) -> SynthSummary:
    """generate_chest_dataset, then the montage PNG when asked for (the script's job)."""
    summary = generate_chest_dataset(cfg)
    if extra.montage is not None:
        logging.getLogger(__name__).info("montage: %s", save_chest_montage(cfg.out_dir, extra.montage))
    return summary

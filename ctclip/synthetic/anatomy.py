"""The real chest CT that every synthetic scan is built from, loaded once per process and cached.

`load_chest_base` reads the sample contrast chest CT and its organ labels (`ctcore.samples`) in RAS,
erases the sample patient's own findings (`remove_real_findings`), gives the air rim along the lobe
masks to the lobes, low-passes the HU for the target grid, and lists candidate nodule sites per lobe.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ctclip.synthetic.canvas import LOBES, bbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChestBase:
    """The real chest CT, RAS, as float32 HU (x, y, z) and its labels; shared read-only by all volumes."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray  # voxel -> world (RAS mm), diagonal
    ids: dict[str, int]
    centre_mm: np.ndarray  # mediastinum centre in x, y; lung centre in z
    crop_mm: tuple[float, float, float, float]  # allowed z-crop: bottom in [a, b], top in [c, d]
    sites: dict[str, np.ndarray]  # lobe -> (N, 4) base voxel x, y, z and depth inside the lung (mm)
    source: str


def _read_structures(path: Path) -> dict[str, int]:
    table = pd.read_csv(path)
    return {str(s): int(i) for s, i in zip(table["structure"], table["id"], strict=True)}


@functools.lru_cache(maxsize=1)
def _real_chest(samples_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int], str]:
    """The sample chest CT and labels, RAS, (z, y, x) in memory, with the patient's own findings erased."""
    from ctcore.samples import fetch_samples

    s = fetch_samples(samples_dir, keys=["chest_ct", "chest_mask", "chest_structures"])
    ct = nib.as_closest_canonical(nib.load(s.chest_ct))
    mask = nib.as_closest_canonical(nib.load(s.chest_mask))
    if not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise ValueError("chest_ct and chest_mask grids differ")
    if np.abs(ct.affine[:3, :3] - np.diag(np.diag(ct.affine[:3, :3]))).max() > 1e-6:
        raise ValueError("the sample chest CT is oblique; this generator expects an axis-aligned grid")
    hu = np.ascontiguousarray(np.asarray(ct.dataobj, dtype=np.float32).T)
    labels = np.ascontiguousarray(np.asarray(mask.dataobj).astype(np.uint8).T)
    ids = _read_structures(s.chest_structures)
    erased = remove_real_findings(hu.T, labels.T, np.abs(np.diag(ct.affine)[:3]), ids)
    log.info("base volume: erased the sample patient's own findings (voxels): %s", erased)
    _close_lung_labels(hu, labels, [ids[n] for n in LOBES])
    for a in (hu, labels):
        a.flags.writeable = False
    return hu, labels, ct.affine, ids, str(s.chest_ct)


@functools.lru_cache(maxsize=4)
def load_chest_base(size: tuple[int, int], slices: int, samples_dir: Path | None = None) -> ChestBase:
    """Load the sample chest CT once, reorient to RAS, and low-pass it for the target grid (no aliasing)."""
    hu, labels, affine, ids, source = _real_chest(samples_dir)
    spacing = np.abs(np.diag(affine)[:3])
    nominal = np.array([360.0 / max(size), 360.0 / max(size), 300.0 / slices])
    sigma = 0.4 * np.sqrt(np.maximum((nominal / spacing) ** 2 - 1.0, 0.0))
    if sigma.max() > 0.1:
        hu = ndi.gaussian_filter(hu, sigma[::-1], truncate=3.0)
        hu.flags.writeable = False
    lung_ids = [ids[n] for n in LOBES]
    hu_x, lab_x = hu.T, labels.T  # (x, y, z) views
    lung = np.isin(lab_x, lung_ids)
    chest = lung | (lab_x == ids["heart"])
    xy = nib.affines.apply_affine(affine, np.argwhere(chest[::4, ::4, ::2]) * [4, 4, 2]).mean(axis=0)
    lz = np.flatnonzero(lung.any(axis=(0, 1)))
    z_world = affine[2, 2] * np.arange(hu_x.shape[2]) + affine[2, 3]
    half = spacing[2] / 2
    lo, hi = z_world[0] - half, z_world[-1] + half
    crop = (lo, max(lo, z_world[lz[0]] - 5.0), min(hi, z_world[lz[-1]] + 3.0), hi)
    centre = np.array([xy[0], xy[1], (z_world[lz[0]] + z_world[lz[-1]]) / 2])
    return ChestBase(
        hu=hu_x,
        labels=lab_x,
        affine=affine,
        ids=ids,
        centre_mm=centre,
        crop_mm=crop,
        sites=_nodule_sites(lab_x, spacing, ids),
        source=source,
    )


def _close_lung_labels(hu_zyx: np.ndarray, labels_zyx: np.ndarray, lung_ids: list[int]) -> None:
    """Give the unlabelled air rim just outside the lobe masks (1-2 voxels) to the neighbouring lobe, so
    fluid or a lesion that fills a lobe does not leave a line of air along the chest wall."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[lung_ids] = lung_ids
    lobes = lut[labels_zyx]
    grown = ndi.grey_dilation(lobes, size=(1, 5, 5))
    fill = (labels_zyx == 0) & (grown > 0) & (hu_zyx < -200)
    labels_zyx[fill] = grown[fill]


def _nodule_sites(labels: np.ndarray, spacing: np.ndarray, ids: dict[str, int]) -> dict[str, np.ndarray]:
    """Candidate nodule centres per lobe, with their depth inside the lung (on a 4x coarser x-y grid)."""
    ds = labels[::4, ::4, :]
    lung = np.isin(ds, [ids[n] for n in LOBES])
    depth = ndi.distance_transform_edt(lung, sampling=spacing * [4, 4, 1])
    sites = {}
    for lobe in LOBES:
        idx = np.argwhere((ds == ids[lobe]) & (depth >= 5.0))
        sites[lobe] = np.column_stack([idx * [4, 4, 1], depth[tuple(idx.T)]]).astype(np.float64)
    return sites


# ---- the real patient's own findings ------------------------------------------------------------------


def _inpaint(
    hu: np.ndarray,
    hole: np.ndarray,
    valid: np.ndarray,
    sigma_vox: np.ndarray,
    noise_hu: float,
    rng: np.random.Generator,
) -> None:
    """Fill `hole` with a smooth average of the `valid` voxels around it (normalised convolution)."""
    w = (valid & ~hole).astype(np.float32)
    num = ndi.gaussian_filter(hu * w, sigma_vox)
    den = ndi.gaussian_filter(w, sigma_vox)
    fill = num / np.maximum(den, 1e-3)
    hu[hole] = fill[hole] + noise_hu * rng.standard_normal(int(hole.sum())).astype(np.float32)


def remove_real_findings(
    hu: np.ndarray, labels: np.ndarray, spacing: np.ndarray, ids: dict[str, int]
) -> dict[str, int]:
    """Erase the sample patient's own findings from the base volume (in place, (x, y, z) arrays), so that a
    finding is visible exactly where it was planted: calcified plaques on the aortic wall, and solid
    masses in the lungs (dense lung regions thicker than any vessel inside a lobe). Returns voxel counts."""
    rng = np.random.default_rng(0)
    out = {}
    aorta = labels == ids["aorta"]
    box = bbox(aorta, margin=4)
    a = aorta[box]
    near = ndi.binary_dilation(a, iterations=3) & np.isin(labels[box], [0, ids["aorta"]])
    veins = np.isin(
        labels[box],
        [
            ids[n]
            for n in ("superior_vena_cava", "brachiocephalic_vein_left", "brachiocephalic_vein_right")
            if n in ids
        ],
    )
    # near the dense contrast of the SVC, bright voxels are streak artefacts, not plaque
    far = ndi.distance_transform_edt(~veins, sampling=spacing) > 12.0
    calc = ndi.binary_dilation(near & far & (hu[box] > 550), iterations=1) & near
    sub = hu[box]
    _inpaint(sub, calc, near | a, np.full(3, 2.0), 10.0, rng)
    out["Arterial wall calcification"] = int(calc.sum())
    lut = np.zeros(256, dtype=bool)
    lut[[ids[n] for n in LOBES]] = True
    lung = lut[labels]
    k = 4  # find masses on a 4x coarser in-plane grid, then erase each in a box around it at full resolution
    dense = lung[::k, ::k, :] & (hu[::k, ::k, :] > -300)
    core = ndi.distance_transform_edt(dense, sampling=spacing * [k, k, 1]) > 4.5
    comps, _ = ndi.label(core)
    margin = np.ceil(np.array([12.0, 12.0, 12.0]) / spacing).astype(int)
    out["Lung nodule"] = 0
    for sl in ndi.find_objects(comps):
        box = tuple(
            slice(max(k * a.start - m, 0), min(k * a.stop + m, size))
            for a, m, size in zip(sl[:2], margin[:2], hu.shape[:2], strict=True)
        )
        box += (slice(max(sl[2].start - margin[2], 0), min(sl[2].stop + margin[2], hu.shape[2])),)
        seed = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
        xs, ys, zs = np.nonzero(core[sl])
        seed[
            k * (xs + sl[0].start) - box[0].start,
            k * (ys + sl[1].start) - box[1].start,
            zs + sl[2].start - box[2].start,
        ] = True
        grow = ndi.distance_transform_edt(~seed, sampling=spacing) <= 9.0 + k * spacing[0] / 2
        sub, lg = hu[box], lung[box]
        mass = grow & lg & (sub > -750)  # the solid part, its halo and spicules
        _inpaint(sub, mass, lg & (sub < -750), 4.0 / spacing, 12.0, rng)
        out["Lung nodule"] += int(mass.sum())
    return out

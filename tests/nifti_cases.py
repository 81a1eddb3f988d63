"""Small NIfTI volumes cut from the real chest CT, in the storage variants CT-RATE users meet."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

STRIDE = (8, 8, 4)  # 512x512x133 -> 64x64x34, real anatomy at low resolution


def real_chest(chest_ct: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real chest CT subsampled: (HU int16 array in on-disk LAS order, its affine)."""
    img = nib.load(chest_ct)
    hu = np.asanyarray(img.dataobj)[:: STRIDE[0], :: STRIDE[1], :: STRIDE[2]].astype(np.int16)
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag(STRIDE)
    return hu, affine


def write(path: Path, data: np.ndarray, affine: np.ndarray, slope: float | None = None, inter: float | None = None,
          zooms: tuple[float, ...] | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    if zooms is not None:
        img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def reoriented(hu: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with other axis codes (e.g. 'RAS', 'LPS', 'SAR'): data and affine change
    together, so the world-space image is unchanged."""
    start = nib.orientations.io_orientation(affine)
    end = nib.orientations.axcodes2ornt(tuple(codes))
    t = nib.orientations.ornt_transform(start, end)
    data = nib.orientations.apply_orientation(hu, t)
    return np.ascontiguousarray(data), affine @ nib.orientations.inv_ornt_aff(t, hu.shape)

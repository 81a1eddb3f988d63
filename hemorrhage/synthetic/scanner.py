"""The scanner of the synthetic head CT: pose of the head, slice geometry, resampling, noise, localizer.

The head lives in the atlas grid (1 mm, RAS index axes; `synthetic_anatomy`); the scanner puts it in
patient space (LPS) with a rotation and translation, lays out the slices of a series (optionally with
gantry tilt), and samples the atlas on them: HU averaged over the slice thickness, trilinear in-plane,
plus correlated noise; bleed masks resampled the same way give the truth masks and per-slice labels.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import ndimage as ndi

from hemorrhage.classes import CLASSES
from hemorrhage.synthetic.anatomy import HeadAnatomy
from hemorrhage.synthetic.series import SUBTYPE_BIT, SliceGeometry
from hemorrhage.synthetic.style import HU_MAX, HU_MIN

F_RAS_LPS = np.diag([-1.0, -1.0, 1.0])  # atlas index axes (RAS, 1 mm) -> patient axes (LPS)
MIN_BLOOD_FRACTION = 0.6  # a voxel belongs to a finding when at least this much of it is blood
PURE_BLOOD_MAX_HU = 100.0  # above this (before noise) a voxel is partial-volumed with bone


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation (degrees) about z (in-plane), x (nodding) and y (tilting to one shoulder)."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


def slice_geometry(n: int, spacing: float, thickness: float, ps: float, size: int, tilt_deg: float,
                   centre: np.ndarray) -> SliceGeometry:
    t = np.radians(tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row, col)
    k = np.arange(n) - (n - 1) / 2.0
    pos = centre[None, :] + k[:, None] * spacing * normal - (size - 1) / 2.0 * ps * (row + col)
    orient = tuple(float(round(v, 6)) for v in (*row, *col))
    return SliceGeometry(orient, np.round(pos, 4), ps, thickness, spacing, size, size)


def _index_affine(g: SliceGeometry, rot: np.ndarray, trans: np.ndarray, centre: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(M, off): atlas index = M @ (slice, row, column) + off."""
    o = np.asarray(g.orientation)
    to_atlas = F_RAS_LPS @ rot.T
    m = to_atlas @ np.stack([g.spacing * g.normal, g.pixel_spacing * o[3:], g.pixel_spacing * o[:3]], axis=1)
    off = to_atlas @ (g.positions[0] - trans) + centre
    return m, off


def _blur_size(thickness: float) -> int:
    """Slab averaging window in 1 mm atlas voxels, odd so that it stays centred on the slice."""
    return max(1, 2 * int(round((thickness - 1.0) / 2.0)) + 1)


def _resample_hu(vol: np.ndarray, m: np.ndarray, off: np.ndarray, shape: tuple[int, int, int],
                 blur: int) -> np.ndarray:
    """Trilinear samples of the (slab-averaged) atlas-space volume on the output grid."""
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in shape])), float) @ m.T + off
    lo = np.maximum(np.floor(corners.min(0)).astype(int) - 2 - np.array([0, 0, blur]), 0)
    hi = np.minimum(np.ceil(corners.max(0)).astype(int) + 3 + np.array([0, 0, blur]), vol.shape)
    if np.any(hi <= lo):
        return np.full(shape, -1000.0, np.float32)
    sub = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if blur > 1:
        sub = ndi.uniform_filter1d(sub, blur, axis=2, mode="nearest")
    return ndi.affine_transform(sub, m, off - lo, output_shape=shape, order=1, mode="constant",
                                cval=-1000.0, prefilter=False)


def _resample_mask(mask: np.ndarray, box_lo: np.ndarray, m: np.ndarray, off: np.ndarray,
                   shape: tuple[int, int, int], blur: int) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Where a box-local mask lands on the output grid: (output box, voxels mostly covered by it)."""
    pad = blur // 2 + 1
    arr = np.pad(mask.astype(np.float32), ((1, 1), (1, 1), (pad, pad)))
    lo = box_lo - np.array([1, 1, pad])
    if blur > 1:
        arr = ndi.uniform_filter1d(arr, blur, axis=2, mode="constant")
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in arr.shape])), float) + lo
    out = (corners - off) @ np.linalg.inv(m).T
    olo = np.clip(np.floor(out.min(0)).astype(int) - 1, 0, shape)
    ohi = np.clip(np.ceil(out.max(0)).astype(int) + 2, 0, shape)
    if np.any(ohi <= olo):
        return None
    frac = ndi.affine_transform(arr, m, off + m @ olo - lo, output_shape=tuple(ohi - olo), order=1,
                                mode="constant", cval=0.0, prefilter=False)
    return tuple(slice(int(a), int(b)) for a, b in zip(olo, ohi, strict=True)), frac >= MIN_BLOOD_FRACTION


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_hu: float,
                      pixel_spacing: float) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    corr = 0.35 / pixel_spacing  # CT noise grain of about 0.35 mm, in pixels
    if corr >= 0.4:
        noise = ndi.gaussian_filter(noise, (0, corr, corr))
        noise /= noise.std() + 1e-6
    return noise * sigma_hu


def sample_series(head: np.ndarray, masks: dict[str, tuple[np.ndarray, np.ndarray]], g: SliceGeometry,
                  rot: np.ndarray, trans: np.ndarray, anat: HeadAnatomy, rng: np.random.Generator,
                  sigma_hu: float, min_label_mm2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(g.positions)
    shape = (n, g.rows, g.columns)
    m, off = _index_affine(g, rot, trans, anat.centre)
    blur = _blur_size(g.thickness)
    clean = _resample_hu(head, m, off, shape, blur)
    hu = np.clip(np.rint(clean + _correlated_noise(rng, shape, sigma_hu, g.pixel_spacing)), HU_MIN, HU_MAX)
    hu = hu.astype(np.int16)
    bits = np.zeros(shape, np.uint8)
    labels = np.zeros((n, len(CLASSES)), np.uint8)
    min_px = max(1, math.ceil(min_label_mm2 / g.pixel_spacing**2))
    for s, (lo, union) in masks.items():
        res = _resample_mask(union, lo, m, off, shape, blur)
        if res is None:
            continue
        box, on = res
        on &= clean[box] < PURE_BLOOD_MAX_HU  # blood blurred with the skull reads as bone, not blood
        counts = on.sum(axis=(1, 2))
        on[counts < min_px] = False  # too little on a slice to call: neither mask nor label
        bits[box][on] |= SUBTYPE_BIT[s]
        labels[box[0], CLASSES.index(s)] = counts >= min_px
    labels[:, 0] = labels[:, 1:].max(axis=1)
    return hu, bits, labels


def lateral_localizer(head: np.ndarray, anat: HeadAnatomy, rot: np.ndarray, trans: np.ndarray, size: int
                      ) -> tuple[np.ndarray, float, np.ndarray]:
    """A lateral projection radiograph of the head, as HU-like values (bone bright)."""
    mu = np.clip(head + 1000.0, 0.0, None).sum(axis=0) * (0.02 / 1000.0)  # line integral along x
    ps = 280.0 / size
    half = (size - 1) / 2.0 * ps
    cy, cz = anat.centre[1], anat.centre[2]
    m = np.array([[0.0, -ps], [-ps, 0.0]])
    img = ndi.affine_transform(mu, m, (cy + half, cz + half), output_shape=(size, size), order=1, cval=0.0)
    image = np.clip(-1000.0 + 900.0 * img, HU_MIN, HU_MAX).astype(np.int16)
    corner = np.array([anat.centre[0], cy + half, cz + half])
    position = rot @ (F_RAS_LPS @ (corner - anat.centre)) + trans
    return image, ps, np.round(position, 4)

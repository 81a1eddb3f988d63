"""The planting toolkit of the synthetic chest CT: the `Canvas` a scan is planted on and the geometry
the planters share (boxes, ellipsoids, tubes, smooth random fields, dependent layers, specks, distances).

Sizes are in millimetres and are converted with the grid spacing, so lesions keep their physical
size at every matrix size. Centres snap to voxel centres so a small lesion on a coarse grid still
covers at least one voxel. Planted regions never overlap: `canvas.claimed` marks what earlier
planters took, so the mean HU inside every mask is the density that was planted.

Array axes are (x, y, z) in RAS: x grows to the patient's right, y anteriorly, z upwards.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi

LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)


@dataclass
class Canvas:
    """One scan on its output grid, while findings are planted into it."""

    hu: np.ndarray  # float32 (x, y, z)
    labels: np.ndarray  # uint8 anatomy labels (TotalSegmentator ids), same grid
    spacing: np.ndarray  # (3,) mm
    ids: dict[str, int]  # structure name -> label id
    base_to_out: np.ndarray  # 4x4: base voxel -> output voxel (for sites chosen on the base)
    claimed: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.claimed = np.zeros(self.hu.shape, dtype=bool)

    def organ(self, *names: str) -> np.ndarray:
        lut = np.zeros(256, dtype=bool)
        lut[[self.ids[n] for n in names if n in self.ids]] = True
        return lut[self.labels]

    def lung(self) -> np.ndarray:
        return self.organ(*LOBES)

    def commit(
        self, mask: np.ndarray, values: np.ndarray | float, box: tuple[slice, ...] | None = None
    ) -> None:
        """Write `values` where `mask` (given on `box` or the whole grid) and claim those voxels."""
        box = box or tuple(slice(None) for _ in range(3))
        sub = self.hu[box]
        sub[mask] = values[mask] if isinstance(values, np.ndarray) else values
        self.claimed[box] |= mask


# ---- geometry helpers ---------------------------------------------------------------------------


def bbox(mask: np.ndarray, margin: np.ndarray | int = 0) -> tuple[slice, ...] | None:
    """Bounding box of a mask, grown by `margin` voxels per axis and clipped to the array."""
    margin = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    out = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if hit.size == 0:
            return None
        out.append(slice(max(hit[0] - margin[ax], 0), min(hit[-1] + 1 + margin[ax], mask.shape[ax])))
    return tuple(out)


def box_around(centre: np.ndarray, radius_vox: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = np.maximum(np.floor(centre - radius_vox).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(centre + radius_vox).astype(int) + 2, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def offsets_mm(box: tuple[slice, ...], centre: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Open-grid coordinates (mm) of the box voxels relative to `centre` (voxel units)."""
    return [
        ((np.arange(s.start, s.stop) - c) * sp).reshape([-1 if a == ax else 1 for a in range(3)])
        for ax, (s, c, sp) in enumerate(zip(box, centre, spacing, strict=True))
    ]


def ellipsoid_distance(
    box: tuple[slice, ...], spacing: np.ndarray, centre: np.ndarray, radii_mm: np.ndarray, angle: float = 0.0
) -> np.ndarray:
    """Normalised ellipsoid radius of the box voxels (1.0 on the surface); in-plane rotation `angle`."""
    dx, dy, dz = offsets_mm(box, centre, spacing)
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    return np.sqrt((u / radii_mm[0]) ** 2 + (v / radii_mm[1]) ** 2 + (dz / radii_mm[2]) ** 2)


def ellipsoid(
    shape: tuple[int, ...], spacing: np.ndarray, centre: np.ndarray, radii_mm: np.ndarray, angle: float = 0.0
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Ellipsoid (in-plane rotation `angle`) as (box, mask on the box)."""
    radii_mm = np.asarray(radii_mm, dtype=float)
    box = box_around(centre, radii_mm.max() / spacing, shape)
    return box, ellipsoid_distance(box, spacing, centre, radii_mm, angle) <= 1.0


def box_between(
    a: np.ndarray, b: np.ndarray, radius_vox: np.ndarray, shape: tuple[int, ...]
) -> tuple[slice, ...]:
    """The box around the segment a-b (voxel coordinates), grown by `radius_vox` per axis."""
    lo = np.maximum(np.floor(np.minimum(a, b) - radius_vox).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(np.maximum(a, b) + radius_vox).astype(int) + 2, shape)
    return tuple(slice(int(lo_), int(max(hi_, lo_))) for lo_, hi_ in zip(lo, hi, strict=True))


def segment_distance(
    box: tuple[slice, ...], spacing: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of the box voxels to the segment a-b (voxel coordinates), and where along the
    segment their closest point lies (0 at a, 1 at b)."""
    d = (np.asarray(b, dtype=float) - a) * spacing
    dx, dy, dz = offsets_mm(box, np.asarray(a, dtype=float), spacing)
    t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    return np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2), t


@dataclass(frozen=True)
class Tube:
    """A straight airway piece from `a` to `b` (voxel coordinates; a == b gives a ball, e.g. a cyst): lumen
    radius `lumen_mm` at a and b, wall `wall_mm` thick; `bead` = (amplitude, period_mm) swells the
    lumen periodically along the tube (varicose)."""

    a: np.ndarray
    b: np.ndarray
    lumen_mm: tuple[float, float]
    wall_mm: float
    bead: tuple[float, float] = (0.0, 1.0)


def draw_tubes(
    shape: tuple[int, ...], spacing: np.ndarray, tubes: list[Tube]
) -> tuple[np.ndarray, np.ndarray]:
    """(wall, lumen) full-grid masks of a set of tubes. A lumen stays open where it crosses another tube's
    wall (branch points), so the airways connect."""
    wall = np.zeros(shape, dtype=bool)
    lumen = np.zeros(shape, dtype=bool)
    for tb in tubes:
        amp, period = tb.bead
        reach = max(tb.lumen_mm) * (1 + amp) + tb.wall_mm
        box = box_between(tb.a, tb.b, reach / spacing, shape)
        if any(s.stop <= s.start for s in box):
            continue
        dist, t = segment_distance(box, spacing, tb.a, tb.b)
        r = tb.lumen_mm[0] + (tb.lumen_mm[1] - tb.lumen_mm[0]) * t
        if amp:
            length = float(np.linalg.norm((tb.b - tb.a) * spacing))
            r = r * (1 + amp * np.sin(2 * np.pi * t * length / period))
        lumen[box] |= dist <= r
        wall[box] |= dist <= r + tb.wall_mm
    wall &= ~lumen
    return wall, lumen


def smooth_field(
    shape: tuple[int, ...], spacing: np.ndarray, corr_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Random smooth field (about N(0,1)) with blobs of roughly `corr_mm`, built on a coarse grid."""
    extent = np.asarray(shape) * spacing
    coarse = np.maximum(np.ceil(extent / corr_mm).astype(int) + 1, 2)
    noise = rng.standard_normal(tuple(coarse)).astype(np.float32)
    out = ndi.zoom(noise, np.asarray(shape) / coarse, order=1, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, n) for n in shape)] * 1.6  # linear interpolation shrinks the spread


def pick_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return None
    return np.array(np.unravel_index(flat[rng.integers(flat.size)], mask.shape), dtype=float)


def dependent_band(canvas: Canvas, region: np.ndarray, depth_mm: float, height_mm: float) -> np.ndarray:
    """The posterior (dependent, supine) layer of `region`: `depth_mm` thick at its lowest slice,
    thinning upwards to nothing over `height_mm`, following the curve of the posterior wall."""
    out = np.zeros(region.shape, dtype=bool)
    box = bbox(region)
    if box is None:
        return out
    r = region[box]
    sy, sz = canvas.spacing[1], canvas.spacing[2]
    has = r.any(axis=1)  # (x, z)
    ypost = np.argmax(r, axis=1)  # first voxel from the back (y grows anteriorly)
    z_mm = np.arange(r.shape[2]) * sz
    depth = depth_mm * np.clip(1.0 - z_mm / height_mm, 0.0, 1.0) ** 0.6 / sy  # voxels, per slice
    yy = np.arange(r.shape[1])[None, :, None]
    out[box] = r & has[:, None, :] & (yy - ypost[:, None, :] < depth[None, None, :])
    return out


def lobe_at(canvas: Canvas, voxel: np.ndarray) -> str | None:
    lab = int(canvas.labels[tuple(np.round(voxel).astype(int))])
    return next((lobe for lobe in LOBES if canvas.ids.get(lobe) == lab), None)


def seeded_specks(
    region: np.ndarray,
    spacing: np.ndarray,
    n: int,
    radius_mm: tuple[float, float],
    rng: np.random.Generator,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Small balls of `region` around `n` seeds drawn from `candidates` (default: the region); every seed
    voxel is part of its ball. All balls at once, one voxel offset at a time (emphysema has thousands)."""
    pool = np.flatnonzero(region if candidates is None else candidates & region)
    out = np.zeros(region.shape, dtype=bool)
    if pool.size == 0:
        return out
    seeds = rng.choice(pool, size=min(n, pool.size), replace=False)
    radii = rng.uniform(*radius_mm, size=seeds.size)
    centres = np.stack(np.unravel_index(seeds, region.shape), axis=1)
    reach = np.floor(radii.max() / spacing).astype(int)
    shape = np.array(region.shape)
    for off in itertools.product(*(range(-k, k + 1) for k in reach)):
        mm = np.asarray(off) * spacing
        inside = np.sqrt((mm[0] / radii) ** 2 + (mm[1] / radii) ** 2 + (mm[2] / radii) ** 2) <= 1.0
        pos = centres[inside] + off
        pos = pos[((pos >= 0) & (pos < shape)).all(axis=1)]
        hit = tuple(pos.T)
        out[hit] |= region[hit]
    return out


def distance_outside(mask: np.ndarray, spacing: np.ndarray, step_mm: float = 1.5) -> np.ndarray:
    """Distance (mm) to `mask` for voxels outside it; computed on a grid no finer than `step_mm` in-plane
    (the thresholds it serves are several mm) and repeated back to full size."""
    step = np.maximum(np.floor(step_mm / spacing[:2]).astype(int), 1)
    if step.max() == 1:
        return ndi.distance_transform_edt(~mask, sampling=spacing)
    coarse = mask[:: step[0], :: step[1], :]
    # a coarse voxel is "inside" when any fine voxel of its block is: distances never overshoot
    pad = [(0, (-n) % k) for n, k in zip(mask.shape[:2], step, strict=True)] + [(0, 0)]
    blocks = (
        np.pad(mask, pad).reshape(coarse.shape[0], step[0], coarse.shape[1], step[1], -1).any(axis=(1, 3))
    )
    d = ndi.distance_transform_edt(~blocks, sampling=spacing * [step[0], step[1], 1])
    d = np.repeat(np.repeat(d, step[0], axis=0), step[1], axis=1)[: mask.shape[0], : mask.shape[1]]
    return np.where(mask, 0.0, d)


def depth_in_plane(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each `mask` voxel to the nearest voxel outside it in the same axial slice (the
    depth under the pleura as an axial image shows it); 0 outside. Per slice with OpenCV, much faster
    than a 3D transform; the grids here have square pixels."""
    slices = np.ascontiguousarray(mask.transpose(2, 0, 1)).astype(np.uint8)
    out = np.empty(slices.shape, dtype=np.float32)
    for k, sl in enumerate(slices):
        out[k] = cv2.distanceTransform(sl, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return out.transpose(1, 2, 0) * np.float32(spacing[0])


def polyline(shape: tuple[int, ...], spacing: np.ndarray, points: np.ndarray, radius_mm: float) -> np.ndarray:
    """Full-grid mask of a tube of `radius_mm` along the polyline `points` ((N, 3) voxel coordinates): the
    voxels within the radius of a segment, and always the voxel under every point along the line, so a
    thin wire stays one connected line of voxels on a coarse grid."""
    pts = np.asarray(points, dtype=float)
    out = np.zeros(shape, dtype=bool)
    hi = np.asarray(shape) - 1
    for a, b in itertools.pairwise(pts):
        box = box_between(a, b, radius_mm / spacing, shape)
        if all(s.stop > s.start for s in box):
            out[box] |= segment_distance(box, spacing, a, b)[0] <= radius_mm
        n = int(np.ceil(np.abs(b - a).max() * 2)) + 1
        line = np.round(a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)).astype(int)
        line = line[((line >= 0) & (line <= hi)).all(axis=1)]
        out[tuple(line.T)] = True
    return out


def centreline(mask: np.ndarray, step_vox: float = 1.0) -> np.ndarray | None:
    """Points ((N, 3) voxel coordinates) along the long axis of a tubular `mask` (a vein): the centroids of
    slabs `step_vox` thick across its principal axis, in order along that axis; None if empty."""
    pts = np.argwhere(mask).astype(float)
    if len(pts) == 0:
        return None
    mean = pts.mean(axis=0)
    if len(pts) < 3:
        return mean[None]
    axis = np.linalg.svd(pts - mean, full_matrices=False)[2][0]
    t = (pts - mean) @ axis
    k = np.floor((t - t.min()) / step_vox).astype(int)
    counts = np.bincount(k)
    sums = np.stack([np.bincount(k, weights=pts[:, a]) for a in range(3)], axis=1)
    return sums[counts > 0] / counts[counts > 0, None]


def front_surface(body: np.ndarray) -> np.ndarray:
    """Index along y of the most anterior `body` voxel for every (x, z) column (the skin of the front of
    the chest); -1 where the column holds no body."""
    has = body.any(axis=1)
    last = body.shape[1] - 1 - np.argmax(body[:, ::-1, :], axis=1)
    return np.where(has, last, -1)

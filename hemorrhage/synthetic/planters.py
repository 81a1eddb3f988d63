"""Planted hemorrhages on the synthetic head (`hemorrhage.synthetic.anatomy`), in the atlas voxel grid.

The ``plant_*`` functions put one acute bleed (about 50-90 HU) of a given subtype inside a slab of the
head (the part a CT series covers) and return it as a `Bleed`: a boolean mask in a box of the grid.
`PLANTERS` maps each subtype to its planter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from hemorrhage.synthetic.anatomy import BRAIN, CSF, HeadAnatomy


@dataclass(frozen=True)
class SlabBand:
    """The part of the head a series covers: |(p - centre) . normal| <= half (atlas index space)."""

    centre: np.ndarray
    normal: np.ndarray
    half: float

    def contains(self, pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
        return np.abs((pts - self.centre) @ self.normal) <= self.half - margin


@dataclass
class Bleed:
    """One planted hemorrhage: a mask in box `box` of the atlas grid, painted with `density` HU."""

    subtype: str
    box: tuple[slice, slice, slice]
    mask: np.ndarray
    density: float
    pattern: str
    rim: np.ndarray | None = None  # oedema around an intraparenchymal bleed (not part of the finding)
    rim_delta: float = 0.0
    info: dict = field(default_factory=dict)

    def paint_rim(self, hu: np.ndarray) -> None:
        if self.rim is not None:
            hu[self.box][self.rim] += self.rim_delta

    def paint(self, hu: np.ndarray) -> None:
        hu[self.box][self.mask] = self.density

    def summary(self) -> dict:
        return {"subtype": self.subtype, "pattern": self.pattern, "density_hu": round(self.density, 1),
                "volume_ml": round(float(self.mask.sum()) / 1000.0, 2), **self.info}


def _box(centre: np.ndarray, half: float, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _local(box: tuple[slice, ...], c: np.ndarray) -> list[np.ndarray]:
    """Broadcastable coordinates of the box's voxels relative to c."""
    return [np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) - c[i]
            for i, s in enumerate(box)]


def _pick(rng: np.random.Generator, pts: np.ndarray, slab: SlabBand, margin: float) -> np.ndarray | None:
    ok = pts[slab.contains(pts, margin)]
    if len(ok) == 0:
        return None
    return ok[rng.integers(len(ok))].astype(np.float64)


def _inward_normal(anat: HeadAnatomy, c: np.ndarray) -> np.ndarray:
    """Unit vector into the head at a point of the inner table (gradient of the depth map)."""
    box = _box(c, 3, anat.shape)
    g = np.array([np.mean(np.gradient(anat.depth[box], axis=a)) for a in range(3)])
    if np.linalg.norm(g) < 1e-3:
        g = anat.centre - c
    return g / np.linalg.norm(g)


def _extra_axial(anat: HeadAnatomy, rng: np.random.Generator, slab: SlabBand, subtype: str,
                 radius: float, thickness: float, exponent: float, one_side: bool) -> Bleed | None:
    """A collection on the inner table: blood where depth <= thickness * (1 - (r/R)^2)^exponent.

    r is the distance from the axis through the centre point along the inward normal, so the outer
    surface follows the skull and the inner one bulges into the brain (exponent 1: biconvex lens;
    exponent < 1: flat crescent with tapered ends).
    """
    c = _pick(rng, anat.surface_pts, slab, margin=min(8.0, slab.half * 0.5))
    if c is None:
        return None
    nrm = _inward_normal(anat, c)
    box = _box(c, radius + 2, anat.shape)
    qx, qy, qz = _local(box, c)
    a = qx * nrm[0] + qy * nrm[1] + qz * nrm[2]
    r2 = qx**2 + qy**2 + qz**2 - a**2
    prof = thickness * np.clip(1.0 - r2 / radius**2, 0.0, None) ** exponent
    mask = (anat.tissue[box] >= CSF) & (anat.depth[box] <= prof) & (a > -6.0)
    if one_side:  # a subdural collection stops at the falx
        side = np.sign(c[0] - anat.midline_x)
        mask &= (qx + c[0] - anat.midline_x) * side > 2.0
        mask &= (qz + c[2]) >= anat.supratentorial_z - 10
    if mask.sum() < 50:
        return None
    density = rng.uniform(58.0, 85.0)
    return Bleed(subtype, box, mask, density, "convexity",
                 info={"radius_mm": round(radius, 1), "thickness_mm": round(thickness, 1)})


def plant_epidural(anat: HeadAnatomy, rng: np.random.Generator, slab: SlabBand, **_: object) -> Bleed | None:
    """Biconvex lens between skull and brain; short (does not cross sutures), thick."""
    return _extra_axial(anat, rng, slab, "epidural", rng.uniform(18, 30), rng.uniform(8, 17), 1.0, False)


def plant_subdural(anat: HeadAnatomy, rng: np.random.Generator, slab: SlabBand, **_: object) -> Bleed | None:
    """Crescent along the convexity of one hemisphere: long (crosses sutures), thin."""
    return _extra_axial(anat, rng, slab, "subdural", rng.uniform(45, 65), rng.uniform(4, 10), 0.5, True)


def plant_intraparenchymal(anat: HeadAnatomy, rng: np.random.Generator, slab: SlabBand,
                           **_: object) -> Bleed | None:
    """Irregular ellipsoidal haematoma in the parenchyma with a darker oedema rim."""
    radius = rng.uniform(6, 16)
    c = _pick(rng, anat.deep_pts, slab, margin=min(radius * 0.5, slab.half * 0.5))
    if c is None:
        return None
    half = 1.4 * radius + 6
    box = _box(c, half, anat.shape)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    scale = rng.uniform(0.75, 1.3, 3)
    q = _local(box, c)
    rho2 = sum(((rot[0, k] * q[0] + rot[1, k] * q[1] + rot[2, k] * q[2]) / scale[k]) ** 2 for k in range(3))
    shape = anat.hu[box].shape
    noise = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(2.0, radius / 3))
    noise /= noise.std() + 1e-6
    inside = (anat.tissue[box] == BRAIN) & ~anat.ventricles[box]
    mask = (np.sqrt(rho2) / radius + 0.22 * noise < 1.0) & inside
    lab, n = ndi.label(mask)
    if n == 0:
        return None
    if n > 1:
        mask = lab == 1 + int(np.argmax(ndi.sum_labels(mask, lab, np.arange(1, n + 1))))
    rim_w = rng.uniform(2.0, 5.0)
    rim = (ndi.distance_transform_edt(~mask) <= rim_w) & ~mask & inside
    return Bleed("intraparenchymal", box, mask, rng.uniform(60.0, 85.0), "haematoma", rim=rim,
                 rim_delta=-rng.uniform(7.0, 13.0), info={"radius_mm": round(radius, 1)})


def plant_intraventricular(anat: HeadAnatomy, rng: np.random.Generator, slab: SlabBand,
                           gravity: np.ndarray | None = None, **_: object) -> Bleed | None:
    """Blood in the lateral ventricles: a dependent layer with a fluid level, or a cast of one side."""
    pts = anat.ventricle_pts.astype(np.float64)
    in_slab = slab.contains(pts, 0.0)
    gravity = np.array([0.0, -1.0, 0.0]) if gravity is None else gravity  # supine: posterior is down
    patterns = ["layering", "cast"] if rng.random() < 0.65 else ["cast", "layering"]
    for pattern in patterns:
        if pattern == "layering":
            depth = pts @ gravity
            frac = rng.uniform(0.12, 0.35)
            sel = depth >= np.quantile(depth, 1.0 - frac)
        else:
            sel = anat.ventricle_side == (1 if rng.random() < 0.5 else -1)
        if np.count_nonzero(sel & in_slab) >= 40:
            break
    else:
        return None
    chosen = anat.ventricle_pts[sel].astype(np.int64)
    lo, hi = chosen.min(0), chosen.max(0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    mask = np.zeros(tuple(hi - lo), bool)
    mask[tuple((chosen - lo).T)] = True
    return Bleed("intraventricular", box, mask, rng.uniform(63.0, 85.0), pattern)  # type: ignore[arg-type]


def plant_subarachnoid(anat: HeadAnatomy, rng: np.random.Generator, slab: SlabBand, **_: object) -> Bleed | None:
    """Blood filling sulci over the convexity, or the basal cisterns (thin hyperdense lines)."""
    patterns = ["convexity", "basal"] if rng.random() < 0.6 else ["basal", "convexity"]
    for pattern in patterns:
        pts = anat.cortex_pts if pattern == "convexity" else anat.cistern_pts
        c = _pick(rng, pts, slab, margin=min(4.0, slab.half * 0.5))
        if c is None:
            continue
        radius = rng.uniform(20, 32) if pattern == "convexity" else rng.uniform(22, 35)
        box = _box(c, radius + 2, anat.shape)
        qx, qy, qz = _local(box, c)
        ball = qx**2 + qy**2 + qz**2 <= radius**2
        if pattern == "convexity":
            csf_gap = (anat.tissue[box] == CSF) & (anat.depth[box] <= 1.5)
            mask = ball & (anat.sulci[box] | (csf_gap & (qx**2 + qy**2 + qz**2 <= (0.7 * radius) ** 2)))
        else:
            mask = ndi.binary_dilation(ball & anat.cisterns[box], iterations=1)
            mask &= (anat.tissue[box] >= CSF) & ~anat.ventricles[box]
        if mask.sum() >= 150:
            return Bleed("subarachnoid", box, mask, rng.uniform(65.0, 85.0), pattern,
                         info={"radius_mm": round(radius, 1)})
    return None


PLANTERS: dict[str, Callable[..., Bleed | None]] = {
    "epidural": plant_epidural,
    "intraparenchymal": plant_intraparenchymal,
    "intraventricular": plant_intraventricular,
    "subarachnoid": plant_subarachnoid,
    "subdural": plant_subdural,
}

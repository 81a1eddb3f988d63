"""A synthetic head on the real CT brain atlas: scalp, skull, sulci, ventricles and cisterns.

Everything here lives in the atlas voxel grid: 1 mm voxels, index order ``[x, y, z]`` in RAS (x to the
patient's right, y anterior, z superior). `load_head_anatomy` builds the head once per process (a few
seconds; cached): the skull-stripped atlas brain gets a thin layer of CSF, a skull (dense inner and
outer tables around a lower-density diploe, a skull base bridging the temporal and posterior fossae),
a scalp with a fat layer, radial sulci over the convexity (the atlas is an average brain whose sulci
are blurred away) and masks of the lateral ventricles and the basal cisterns.

The bleeds planted into this head are in `hemorrhage.synthetic.planters`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

AIR, SCALP, BONE, CSF, BRAIN = 0, 1, 2, 3, 4  # tissue codes
MARGIN_MM = 24  # room around the brain for CSF, skull and scalp
CSF_HU = 7.0


@dataclass(frozen=True, eq=False)
class HeadAnatomy:
    """The synthetic head in the atlas grid (see the module docstring for the axes)."""

    hu: np.ndarray  # float32 base HU; air -1000
    tissue: np.ndarray  # uint8 tissue code (AIR .. BRAIN)
    depth: np.ndarray  # float32 mm inside the intracranial space, measured from the inner table
    sulci: np.ndarray  # bool, CSF-filled sulci over the convexity
    ventricles: np.ndarray  # bool, lateral ventricles
    cisterns: np.ndarray  # bool, basal CSF spaces below the lateral ventricles
    centre: np.ndarray  # (3,) centre of the brain, index coordinates
    midline_x: float
    brain_z: tuple[int, int]  # lowest and highest brain voxel row along z
    supratentorial_z: float  # convexity findings are planted above this level
    surface_pts: np.ndarray  # (N, 3) int16: intracranial voxels touching the inner table (convexity)
    cortex_pts: np.ndarray  # (N, 3) int16: brain voxels just under the surface
    deep_pts: np.ndarray  # (N, 3) int16: parenchyma away from surface and ventricles
    ventricle_pts: np.ndarray  # (N, 3) int16
    ventricle_side: np.ndarray  # (N,) int8: -1 left, +1 right lateral ventricle
    cistern_pts: np.ndarray  # (N, 3) int16

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- building


def _crop_pad(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, fill: float) -> np.ndarray:
    """a[lo:hi] with out-of-range parts filled: the atlas box grown by the margin."""
    out = np.full(tuple(hi - lo), fill, dtype=a.dtype)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, a.shape)
    dst = tuple(slice(s - lo_, e - lo_) for s, e, lo_ in zip(src_lo, src_hi, lo, strict=True))
    out[dst] = a[tuple(slice(s, e) for s, e in zip(src_lo, src_hi, strict=True))]
    return out


def _sphere_field(rng: np.random.Generator, u: np.ndarray, n_waves: int, freq: tuple[float, float],
                  radius: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A smooth random function of the direction u (N, 3): a sum of plane waves on the unit sphere.

    With `radius` (distance of each point from the centre) also returns |grad| in mm^-1, so that
    |g| / |grad g| approximates the distance to the zero level set (a radial sheet).
    """
    g = np.zeros(len(u), np.float32)
    grad = np.zeros_like(u) if radius is not None else None
    for _ in range(n_waves):
        w = rng.normal(size=3)
        w /= np.linalg.norm(w)
        f = rng.uniform(*freq)
        phase = u @ (f * w).astype(np.float32) + rng.uniform(0, 2 * np.pi)
        g += np.cos(phase)
        if grad is not None:
            wu = u @ w.astype(np.float32)
            grad -= (np.sin(phase) * f)[:, None] * (w[None, :].astype(np.float32) - wu[:, None] * u)
    g /= np.sqrt(n_waves / 2.0)
    if grad is None:
        return g, None
    gnorm = np.linalg.norm(grad, axis=1) / np.sqrt(n_waves / 2.0) / np.maximum(radius, 1.0)
    return g, gnorm


def _closing_2mm(mask: np.ndarray, radius_mm: float) -> np.ndarray:
    """Morphological closing with a ball, computed on a 2 mm grid (cheap) and brought back to 1 mm."""
    small = mask[::2, ::2, ::2]
    dil = ndi.distance_transform_edt(~small, sampling=2.0) <= radius_mm
    closed = ndi.distance_transform_edt(dil, sampling=2.0) > radius_mm
    up = np.repeat(np.repeat(np.repeat(closed, 2, 0), 2, 1), 2, 2)[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    return (ndi.gaussian_filter(up.astype(np.float32), 1.0) > 0.5) | mask


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float) -> np.ndarray:
    """Unit-variance smooth noise, drawn on a 2 mm grid and interpolated to 1 mm."""
    small = tuple(s // 2 + 2 for s in shape)
    n = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma_mm / 2.0)
    n /= n.std() + 1e-6
    up = ndi.zoom(n, 2.0, order=1)
    return up[: shape[0], : shape[1], : shape[2]]


def _lateral_ventricles(atlas: np.ndarray, brain: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The two largest deep CSF-dark components of the atlas, grown by their partial-volume rim."""
    dark = (atlas < 15) & brain & (depth > 6.5)
    lab, n = ndi.label(dark)
    if n < 2:
        raise ValueError("brain atlas: could not find the lateral ventricles (fewer than two dark regions)")
    sizes = ndi.sum_labels(dark, lab, np.arange(1, n + 1))
    keep = 1 + np.argsort(sizes)[::-1][:2]
    vent = np.isin(lab, keep)
    return ndi.binary_dilation(vent, iterations=1) & (atlas < 25) & brain


def _load_atlas(atlas_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(atlas HU, brain mask) in RAS, cropped to the brain and grown by MARGIN_MM on every side."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(atlas_path)))
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if not np.allclose(zooms, 1.0, atol=0.05):
        raise ValueError(f"brain atlas {atlas_path}: expected 1 mm voxels, got {zooms.tolist()}")
    raw = np.asarray(img.dataobj, dtype=np.float32)
    brain0 = ndi.binary_fill_holes(raw != 0)
    idx = np.argwhere(brain0)
    if len(idx) == 0:
        raise ValueError(f"brain atlas {atlas_path}: no brain voxels (all zero)")
    lo, hi = idx.min(0) - MARGIN_MM, idx.max(0) + 1 + MARGIN_MM
    return _crop_pad(raw, lo, hi, 0.0), _crop_pad(brain0, lo, hi, False)


def _paint_skull_and_scalp(hu: np.ndarray, tissue: np.ndarray, rng: np.random.Generator, d_out: np.ndarray,
                           centre: np.ndarray, texture: np.ndarray) -> None:
    """Skull and scalp: layers at distance t outside the closed intracranial space, thickness varying
    smoothly with the direction from the centre."""
    shell = (d_out > 0) & (d_out <= 20)
    pts = np.argwhere(shell)
    t = d_out[shell]
    u = (pts - centre).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True) + 1e-6
    thick = np.clip(6.0 + 1.4 * _sphere_field(rng, u, 8, (1.5, 3.5))[0], 4.0, 9.0)
    scalp = np.clip(5.0 + 1.2 * _sphere_field(rng, u, 8, (1.5, 3.5))[0], 3.5, 7.5)
    tex = texture[shell]
    cortical = 1500.0 + 120.0 * tex
    diploe = 620.0 + 160.0 * tex
    w = np.maximum(np.exp(-t / 1.3), np.exp(-(thick - t) / 1.5))
    bone_hu = diploe + (cortical - diploe) * np.clip(w, 0, 1)
    s = (t - thick) / scalp
    scalp_hu = 42.0 - 110.0 * np.exp(-(((s - 0.5) / 0.16) ** 2))  # skin and galea around a fat layer
    in_bone, in_scalp = t <= thick, (t > thick) & (s <= 1.0)
    vals = np.where(in_bone, bone_hu, np.where(in_scalp, scalp_hu, -1000.0))
    hu[shell] = vals
    tissue[shell] = np.where(in_bone, BONE, np.where(in_scalp, SCALP, AIR))


def _sulci(rng: np.random.Generator, brain: np.ndarray, depth: np.ndarray, ventricles: np.ndarray,
           centre: np.ndarray) -> np.ndarray:
    """Radial CSF sheets over the cortex: the zero set of a smooth function of direction."""
    cortex = brain & (depth < 22) & ~ventricles
    cpts = np.argwhere(cortex)
    rvec = (cpts - centre).astype(np.float32)
    radius = np.linalg.norm(rvec, axis=1)
    u = rvec / (radius[:, None] + 1e-6)
    g, gnorm = _sphere_field(rng, u, 16, (14.0, 24.0), radius)
    sul_depth = np.clip(11.0 + 3.5 * _sphere_field(rng, u, 6, (2.0, 5.0))[0], 6.0, 17.0)
    d = depth[cortex] - 1.5
    half_width = 0.5 + 0.55 * np.clip(1.0 - d / sul_depth, 0.0, 1.0)
    is_sulcus = (np.abs(g) / (gnorm + 1e-6) < half_width) & (d <= sul_depth)
    sulci = np.zeros_like(brain)
    sulci[tuple(cpts[is_sulcus].T)] = True
    return sulci


def build_head_anatomy(atlas_path: str | Path) -> HeadAnatomy:
    """Build the synthetic head around the atlas brain (deterministic: a fixed internal seed)."""
    atlas, brain = _load_atlas(atlas_path)
    rng = np.random.default_rng(20190923)  # fixed: one head per atlas, studies vary around it

    intracranial = ndi.binary_fill_holes(brain | (ndi.gaussian_filter(brain.astype(np.float32), 2.5) > 0.25))
    closed = _closing_2mm(intracranial, 10.0)
    depth = ndi.distance_transform_edt(intracranial).astype(np.float32)
    d_out = ndi.distance_transform_edt(~closed).astype(np.float32)

    bidx = np.argwhere(brain)
    centre = bidx.mean(0)
    midline_x = float(centre[0])
    brain_z = (int(bidx[:, 2].min()), int(bidx[:, 2].max()))

    hu = np.full(atlas.shape, -1000.0, np.float32)
    tissue = np.zeros(atlas.shape, np.uint8)
    texture = _smooth_noise(rng, atlas.shape, 1.2)
    _paint_skull_and_scalp(hu, tissue, rng, d_out, centre, texture)
    base = closed & ~intracranial  # skull base: petrous ridges, sphenoid wings, fossa floors
    hu[base] = np.clip(900.0 + 350.0 * texture[base], 300.0, 1900.0)
    tissue[base] = BONE
    hu[intracranial] = CSF_HU
    tissue[intracranial] = CSF
    hu[brain] = atlas[brain]
    tissue[brain] = BRAIN

    ventricles = _lateral_ventricles(atlas, brain, depth)
    vz = np.argwhere(ventricles)[:, 2]
    supra_z = float(vz.min() - 12)
    sulci = _sulci(rng, brain, depth, ventricles, centre)
    hu[sulci] = np.minimum(hu[sulci], CSF_HU + 3.0)

    zz = np.arange(atlas.shape[2])[None, None, :]
    cisterns = ((atlas < 18) & brain & (depth > 4) & ~ndi.binary_dilation(ventricles, iterations=2)
                & (zz < vz.min() + 4) & (zz > brain_z[0] + 20))

    xx = np.arange(atlas.shape[0])[:, None, None]
    lateral = np.abs(xx - midline_x) >= 12
    above = zz >= supra_z
    surface = intracranial & (depth > 0.5) & (depth <= 1.5) & lateral & above
    cortex_pts = brain & (depth >= 2.5) & (depth <= 4.0) & (np.abs(xx - midline_x) >= 8) & (zz >= supra_z - 5)
    deep = (brain & (depth >= 16) & (atlas >= 22) & (atlas <= 60) & above & ~sulci
            & ~ndi.binary_dilation(ventricles, iterations=5))
    vpts = np.argwhere(ventricles)
    return HeadAnatomy(
        hu=hu, tissue=tissue, depth=depth, sulci=sulci, ventricles=ventricles, cisterns=cisterns,
        centre=centre, midline_x=midline_x, brain_z=brain_z, supratentorial_z=supra_z,
        surface_pts=np.argwhere(surface).astype(np.int16), cortex_pts=np.argwhere(cortex_pts).astype(np.int16),
        deep_pts=np.argwhere(deep).astype(np.int16), ventricle_pts=vpts.astype(np.int16),
        ventricle_side=np.where(vpts[:, 0] >= midline_x, 1, -1).astype(np.int8),
        cistern_pts=np.argwhere(cisterns).astype(np.int16),
    )


@functools.lru_cache(maxsize=2)
def _cached_anatomy(path: str) -> HeadAnatomy:
    anat = build_head_anatomy(path)
    for value in vars(anat).values():  # shared by every study of the process: nobody may change it
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return anat


def load_head_anatomy(atlas_path: str | Path | None = None) -> HeadAnatomy:
    """The synthetic head, built once per process (default atlas: the ``brain_atlas`` sample)."""
    if atlas_path is None:
        from ctcore.samples import fetch_samples

        atlas_path = fetch_samples(keys=["brain_atlas"]).brain_atlas
    return _cached_anatomy(str(Path(atlas_path).resolve()))

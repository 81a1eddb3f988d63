"""Lesion planters for the synthetic chest CT: each puts one CT-RATE finding into resampled anatomy.

A planter has two halves. `draw(rng, sites)` runs once per patient and returns plain parameters
(side, lobe, size in mm, density), so that every scan and reconstruction of the patient shows the same
finding; `plant(canvas, params, rng)` runs once per scan on the output grid, writes the lesion's HU
into `canvas.hu`, and returns the lesion mask and the facts the report needs (lobe, size, side), or
None when the finding cannot be placed in this scan (then its label is 0: labels stay honest).

Sizes are in millimetres and are converted with the grid spacing, so lesions keep their physical
size at every matrix size. Centres snap to voxel centres so a small lesion on a coarse grid still
covers at least one voxel. Planted regions never overlap: `canvas.claimed` marks what earlier
planters took, so the mean HU inside every mask is the density that was planted.

Array axes are (x, y, z) in RAS: x grows to the patient's right, y anteriorly, z upwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
LOBE_WORDS = {
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
}
SIDE_LOBES = {"left": LOBES[:2], "right": LOBES[2:]}
HEART = ("heart", "atrial_appendage_left")


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


@dataclass(frozen=True)
class Planter:
    name: str
    draw: Callable[[np.random.Generator, dict], dict]
    plant: Callable[[Canvas, dict, np.random.Generator], tuple[np.ndarray, dict] | None]


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
    """Small balls of `region` around `n` seeds drawn from `candidates` (default: the region)."""
    pool = np.flatnonzero(region if candidates is None else candidates & region)
    out = np.zeros(region.shape, dtype=bool)
    if pool.size == 0:
        return out
    seeds = rng.choice(pool, size=min(n, pool.size), replace=False)
    radii = rng.uniform(*radius_mm, size=seeds.size)
    for seed, r in zip(seeds, radii, strict=True):
        centre = np.array(np.unravel_index(seed, region.shape), dtype=float)
        box, ball = ellipsoid(region.shape, spacing, centre, np.full(3, r))
        ball[tuple((centre - [s.start for s in box]).astype(int))] = True  # at least the seed voxel
        out[box] |= ball & region[box]
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


# ---- planters -------------------------------------------------------------------------------------


def _draw_cardiomegaly(rng, sites):
    return {
        "scale": rng.uniform(1.2, 1.35),
        "anchor_back": rng.uniform(0.25, 0.45),
        "anchor_right": rng.uniform(0.1, 0.3),
    }


def _plant_cardiomegaly(cv: Canvas, p: dict, rng):
    heart = cv.organ(*HEART)
    hb = bbox(heart)
    if hb is None:
        return None
    ext = np.array([s.stop - s.start for s in hb])
    box = bbox(
        heart, margin=np.ceil(ext * (p["scale"] - 1) * 0.75 + 12.0 / cv.spacing).astype(int) * [1, 1, 0]
    )
    h = heart[box]
    centre = np.array(ndi.center_of_mass(h))
    anchor = centre[:2] + np.array([p["anchor_right"], -p["anchor_back"]]) * ext[:2] / 2
    # the ventricles enlarge, the atria and great vessels at the top much less: the in-plane scale
    # tapers from `scale` in the lower half of the heart to 1 at its top; the heart grows to the left
    # and forwards (about an anchor at its right-posterior side), into lung and pericardial fat only
    zs = np.flatnonzero(h.any(axis=(0, 1)))
    taper = np.clip((zs[-1] - np.arange(h.shape[2])) / max(0.5 * (zs[-1] - zs[0]), 1.0), 0.0, 1.0)
    factors = 1.0 + (p["scale"] - 1.0) * taper
    grown, scaled = h.copy(), cv.hu[box].copy()
    for k in np.flatnonzero(factors > 1.001):
        f = factors[k]
        grown[:, :, k] = (
            ndi.affine_transform(
                h[:, :, k].astype(np.float32), [1 / f, 1 / f], offset=anchor * (1 - 1 / f), order=1
            )
            > 0.5
        )
        scaled[:, :, k] = ndi.affine_transform(
            cv.hu[box][:, :, k], [1 / f, 1 / f], offset=anchor * (1 - 1 / f), order=1
        )
    near = distance_outside(h, cv.spacing) <= 10.0
    lab = cv.labels[box]
    room = (cv.lung()[box] | (lab == 0) & near) & ~cv.claimed[box]
    new = grown & (h | room)
    cv.commit(new, scaled, box)
    lab[new] = cv.ids["heart"]
    heart_box = h | new
    widths = heart_box.any(axis=1).sum(axis=0) * cv.spacing[0]
    zi = int(np.argmax(widths))
    lung_x = np.flatnonzero(cv.lung()[:, :, box[2].start + zi].any(axis=1))
    thorax = (lung_x[-1] - lung_x[0] + 1) * cv.spacing[0] if lung_x.size else np.nan
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = heart_box
    return mask, {"ctr": round(float(widths[zi] / thorax), 2)}


def _draw_coronary(rng, sites):
    return {"n": int(rng.integers(2, 7)), "radius_mm": (1.2, 2.5), "hu": rng.uniform(450, 900)}


def _plant_coronary(cv: Canvas, p: dict, rng):
    heart = cv.organ(*HEART)
    hb = bbox(heart)
    if hb is None:
        return None
    c = np.array(ndi.center_of_mass(heart[hb])) + [s.start for s in hb]
    m = np.ceil(6.0 / cv.spacing).astype(int) + 1
    z0, z1 = hb[2].start, hb[2].stop
    # the anterior interventricular groove and the left main: front, left, upper part of the heart
    box = (
        slice(max(hb[0].start - m[0], 0), int(c[0] + 0.1 * (hb[0].stop - hb[0].start)) + 1),
        slice(int(c[1]), min(hb[1].stop + m[1], heart.shape[1])),
        slice(int(z0 + 0.35 * (z1 - z0)), min(z1 + m[2], heart.shape[2])),
    )
    h = heart[box]
    band = max(2.5, 1.01 * cv.spacing[:2].max())
    fat = (
        ~h & (distance_outside(h, cv.spacing, step_mm=1.0) <= band) & (cv.labels[box] == 0) & ~cv.claimed[box]
    )
    specks = seeded_specks(fat, cv.spacing, p["n"], p["radius_mm"], rng)
    if not specks.any():
        return None
    cv.commit(specks, p["hu"], box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = specks
    return mask, {"vessel": "left anterior descending artery"}


def _draw_pericardial(rng, sites):
    return {"thickness_mm": rng.uniform(5.0, 12.0), "hu": rng.uniform(5.0, 18.0)}


def _plant_pericardial(cv: Canvas, p: dict, rng):
    heart = cv.organ(*HEART)
    t = max(p["thickness_mm"], 1.01 * cv.spacing[:2].max())
    box = bbox(heart, margin=np.ceil(1.3 * t / cv.spacing).astype(int) + 1)
    if box is None:
        return None
    h = heart[box]
    zs = np.flatnonzero(h.any(axis=(0, 1)))
    # the sac is widest around the ventricles and closes around the great vessels at the top
    height = max(zs[-1] - zs[0], 1)
    taper = np.clip((zs[-1] - 0.15 * height - np.arange(h.shape[2])) / (0.4 * height), 0.0, 1.0) ** 0.7
    wobble = 0.8 + 0.25 * np.clip(smooth_field(h.shape, cv.spacing, 25.0, rng), -1, 1)
    # at least the first ring of voxels around the heart wherever the sac is open, at any grid
    local = np.where(
        taper[None, None, :] > 0,
        np.maximum(t * taper[None, None, :] * wobble, 1.01 * cv.spacing[:2].max()),
        0.0,
    )
    lab, hu = cv.labels[box], cv.hu[box]
    space = (cv.lung()[box] | (lab == 0) & (hu < -20)) & ~cv.claimed[box]
    # distances weigh z double, so the rim hugs the heart contour of each slice rather than capping it
    rim = ~h & (distance_outside(h, cv.spacing * [1, 1, 2]) <= local) & space
    rim[:, :, : zs[0]] = False
    rim[:, :, zs[-1] + 1 :] = False
    if not rim.any():
        return None
    cv.commit(rim, p["hu"], box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = rim
    return mask, {"thickness_mm": round(float(p["thickness_mm"]))}


def _draw_pleural(rng, sites):
    side = str(rng.choice(["right", "left", "both"], p=[0.4, 0.3, 0.3]))
    return {
        "side": side,
        "depth_mm": {s: rng.uniform(12.0, 45.0) for s in ("left", "right")},
        "height_mm": rng.uniform(45.0, 110.0),
        "hu": rng.uniform(4.0, 18.0),
    }


def _plant_pleural(cv: Canvas, p: dict, rng):
    sides = ("left", "right") if p["side"] == "both" else (p["side"],)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    for s in sides:
        lung = cv.organ(*SIDE_LOBES[s]) & ~cv.claimed
        mask |= dependent_band(cv, lung, max(p["depth_mm"][s], cv.spacing[1]), p["height_mm"])
    if not mask.any():
        return None
    cv.commit(mask, p["hu"])
    depth = max(p["depth_mm"][s] for s in sides)
    amount = "small" if depth < 20 else "moderate" if depth < 35 else "large"
    side = "bilateral" if p["side"] == "both" else p["side"]
    return mask, {"side": side, "amount": amount, "depth_mm": round(float(depth))}


def _draw_atelectasis(rng, sites):
    # atelectatic lung enhances after contrast: denser than pleural fluid
    return {
        "side": str(rng.choice(["right", "left"])),
        "depth_mm": rng.uniform(7.0, 14.0),
        "height_mm": rng.uniform(25.0, 60.0),
        "hu": rng.uniform(45.0, 80.0),
    }


def _plant_atelectasis(cv: Canvas, p: dict, rng):
    lobe = SIDE_LOBES[p["side"]][-1 if p["side"] == "right" else 1]  # the lower lobe
    region = cv.organ(lobe) & ~cv.claimed  # above an effusion this is the compressed lung
    band = dependent_band(cv, region, max(p["depth_mm"], cv.spacing[1]), p["height_mm"])
    if not band.any():
        return None
    cv.commit(band, p["hu"])
    return band, {"lobe": LOBE_WORDS[lobe], "kind": "subsegmental"}


def _draw_consolidation(rng, sites):
    lobe = str(rng.choice(LOBES, p=[0.15, 0.3, 0.12, 0.13, 0.3]))
    return {"lobe": lobe, "radius_mm": rng.uniform(25.0, 45.0), "hu": rng.uniform(25.0, 45.0)}


def _patch(
    cv: Canvas, region: np.ndarray, seed: np.ndarray, radius_mm: float, edge_mm: float, rng
) -> tuple[tuple[slice, ...], np.ndarray]:
    """An irregular blob around `seed` (radius about `radius_mm`) as (box, weight in [0, 1] on the box):
    the weight falls off over about `edge_mm` at the border and is 0 outside `region`."""
    r = max(radius_mm, 1.5 * cv.spacing.max())
    box = box_around(seed, 1.5 * r / cv.spacing, region.shape)
    shape = tuple(s.stop - s.start for s in box)
    wobble = 1.0 + 0.3 * np.clip(smooth_field(shape, cv.spacing, r / 2.5, rng), -1.5, 1.5)
    blob = (ellipsoid_distance(box, cv.spacing, seed, np.full(3, r)) <= wobble).astype(np.float32)
    weight = ndi.gaussian_filter(blob, edge_mm / cv.spacing) * region[box]
    weight[tuple((seed - [s.start for s in box]).astype(int))] = 1.0
    return box, weight


def _plant_consolidation(cv: Canvas, p: dict, rng):
    lobe = cv.organ(p["lobe"]) & ~cv.claimed
    lb = bbox(lobe)
    if lb is None:
        return None
    back = lobe.copy()  # seed in the dependent half of the lobe, where pneumonia and aspiration sit
    back[:, (lb[1].start + lb[1].stop) // 2 :, :] = False
    seed = pick_voxel(back if back.any() else lobe, rng)
    box, weight = _patch(cv, lobe, seed, p["radius_mm"], 2.0, rng)
    region = weight >= 0.5
    # air bronchograms: airway lumens (tubes of at least 3x3 voxels, not single dark voxels) stay air
    # and are not part of the mask
    bronchi = region & ndi.binary_opening(cv.hu[box] < -920, structure=np.ones((3, 3, 1), dtype=bool))
    region &= ~bronchi
    if not region.any():
        return None
    texture = p["hu"] + 6.0 * smooth_field(region.shape, cv.spacing, 8.0, rng)
    cv.commit(region, texture, box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = region
    return mask, {"lobe": LOBE_WORDS[p["lobe"]], "air_bronchogram": bool(bronchi.sum() > 3)}


def _draw_nodule(rng, sites):
    n = int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))
    nodules = []
    for _ in range(n):
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(22.0))))
        lobe = str(rng.choice(LOBES, p=[0.25, 0.17, 0.28, 0.1, 0.2]))
        cand = sites[lobe]  # (N, 4): base voxel x, y, z and depth inside the lung in mm
        deep = cand[cand[:, 3] >= diameter / 2 + 3.0]
        if len(deep) == 0:
            deep = cand[np.argsort(cand[:, 3])[-20:]]
        site = deep[rng.integers(len(deep))]
        nodules.append(
            {
                "diameter_mm": diameter,
                "site": site[:3].tolist(),
                "aspect": rng.uniform(0.8, 1.0, 2).tolist(),
                "angle": rng.uniform(0, np.pi),
                "hu": rng.uniform(25.0, 55.0),
            }
        )
    return {"nodules": nodules}


def _plant_nodule(cv: Canvas, p: dict, rng):
    mask = np.zeros(cv.hu.shape, dtype=bool)
    found = []
    lung = None
    for nod in p["nodules"]:
        centre = np.round((cv.base_to_out @ np.append(nod["site"], 1.0))[:3])
        if np.any(centre < 0) or np.any(centre >= cv.hu.shape):
            continue
        r = nod["diameter_mm"] / 2
        radii = np.array([r, r * nod["aspect"][0], r * nod["aspect"][1]])
        # a gently lobulated outline: the ellipsoid's radius wobbles by about +-10 %
        box = box_around(centre, 1.15 * radii.max() / cv.spacing, cv.hu.shape)
        shape = tuple(s.stop - s.start for s in box)
        wobble = 0.1 * np.clip(smooth_field(shape, cv.spacing, max(r / 1.5, 1.0), rng), -1.5, 1.5)
        ell = ellipsoid_distance(box, cv.spacing, centre, radii, nod["angle"]) <= 1.0 + wobble
        ell[tuple((centre - [s.start for s in box]).astype(int))] = True
        lung = cv.lung() if lung is None else lung
        region = ell & lung[box] & ~cv.claimed[box]
        lobe = lobe_at(cv, centre)
        if lobe is None or region.sum() < 0.5 * ell.sum():  # mostly swallowed by fluid or consolidation
            continue
        cv.commit(region, nod["hu"], box)
        mask[box] |= region
        found.append({"lobe": LOBE_WORDS[lobe], "diameter_mm": round(nod["diameter_mm"])})
    if not found:
        return None
    found.sort(key=lambda n: -n["diameter_mm"])
    return mask, {"count": len(found), "largest": found[0], "nodules": found}


def _draw_opacity(rng, sites):
    lobes = rng.choice(LOBES, size=int(rng.integers(1, 3)), replace=False).tolist()
    return {"lobes": lobes, "radius_mm": rng.uniform(15.0, 35.0), "hu": rng.uniform(-620.0, -450.0)}


def _plant_opacity(cv: Canvas, p: dict, rng):
    mask = np.zeros(cv.hu.shape, dtype=bool)
    hit = []
    for lobe in p["lobes"]:
        # parenchyma only: the vessels stay visible through ground glass
        region = cv.organ(lobe) & ~cv.claimed & (cv.hu < -650)
        seed = pick_voxel(region, rng)
        if seed is None:
            continue
        box, weight = _patch(cv, region, seed, p["radius_mm"], 4.0, rng)
        patch = weight >= 0.5
        # ill-defined border: the density rises gradually over a few mm into the patch
        target = p["hu"] + 35.0 * np.clip(smooth_field(patch.shape, cv.spacing, 6.0, rng), -2, 2)
        alpha = np.clip(2.0 * weight - 0.5, 0.0, 1.0)
        cv.commit(patch, cv.hu[box] + alpha * (target - cv.hu[box]), box)
        mask[box] |= patch
        hit.append(LOBE_WORDS[lobe])
    if not hit:
        return None
    return mask, {"lobes": hit, "pattern": "ground-glass"}


def _draw_emphysema(rng, sites):
    return {"fraction": rng.uniform(0.04, 0.14), "radius_mm": (1.5, 5.0), "hu": rng.uniform(-990.0, -965.0)}


def _plant_emphysema(cv: Canvas, p: dict, rng):
    lung = cv.lung() & ~cv.claimed
    box = bbox(lung)
    if box is None:
        return None
    paren = lung[box] & (cv.hu[box] < -700)  # vessels and lesions are spared
    pool = np.flatnonzero(paren)
    if pool.size == 0:
        return None
    # centrilobular emphysema: many small round lucencies, most of them in the upper zones
    z = np.unravel_index(pool, paren.shape)[2]
    upper = (z - z.min()) / max(z.max() - z.min(), 1)
    keep = 0.15 + 0.85 * upper**1.5
    ball = max(4 / 3 * np.pi * np.mean(np.array(p["radius_mm"]) ** 3), np.prod(cv.spacing))
    n = int(np.clip(p["fraction"] * (keep.sum() * np.prod(cv.spacing)) / ball, 1, 6000))
    cand = rng.integers(0, pool.size, size=4 * n)
    cand = cand[rng.random(cand.size) < keep[cand]][:n]
    holes = seeded_specks(
        paren, cv.spacing, n, p["radius_mm"], rng, candidates=_flat_mask(cand, pool, paren.shape)
    )
    if not holes.any():
        return None
    cv.commit(holes, p["hu"], box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = holes
    severity = "mild" if p["fraction"] < 0.08 else "moderate"
    return mask, {"kind": "centrilobular", "zone": "upper lobe predominant", "severity": severity}


def _flat_mask(chosen: np.ndarray, pool: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(int(np.prod(shape)), dtype=bool)
    m[pool[chosen]] = True
    return m.reshape(shape)


def _draw_aortic_calc(rng, sites):
    return {"n": int(rng.integers(4, 14)), "radius_mm": (1.5, 4.0), "hu": rng.uniform(650, 1100)}


def _plant_aortic_calc(cv: Canvas, p: dict, rng):
    aorta = cv.organ("aorta")
    box = bbox(aorta, margin=1)
    if box is None:
        return None
    a = aorta[box]
    # intimal calcification sits on the inner border of the aortic contour
    inner = ndi.distance_transform_edt(a, sampling=cv.spacing)
    rim = a & (inner <= max(2.0, 1.01 * cv.spacing[:2].max())) & ~cv.claimed[box]
    heart_z = np.flatnonzero(cv.organ(*HEART).any(axis=(0, 1)))
    if heart_z.size:  # the thoracic aorta: from the level of the heart's base upwards
        rim[:, :, : max(heart_z[0] - box[2].start, 0)] = False
    specks = seeded_specks(rim, cv.spacing, p["n"], p["radius_mm"], rng)
    if not specks.any():
        return None
    cv.commit(specks, p["hu"], box)
    zs = np.flatnonzero(specks.any(axis=(0, 1))) + box[2].start
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = specks
    return mask, {"where": "thoracic aorta", "extent": "scattered" if len(zs) > 3 else "focal"}


STATIONS = ("right paratracheal", "subcarinal", "aortopulmonary window", "left paratracheal")


def _draw_lymph(rng, sites):
    stations = rng.choice(
        STATIONS, size=int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])), replace=False
    ).tolist()
    return {
        "stations": stations,
        "short_mm": rng.uniform(11.0, 20.0, len(stations)).tolist(),
        "elong": rng.uniform(1.1, 1.6, len(stations)).tolist(),
        "level_mm": rng.uniform(0.0, 1.0, len(stations)).tolist(),
        "hu": rng.uniform(30.0, 45.0),
    }


def _station_point(station: str, level: float, trachea: np.ndarray, sp: np.ndarray) -> np.ndarray | None:
    """Where a node of `station` sits, from the trachea: its lowest slice is the carina."""
    zs = np.flatnonzero(trachea.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    carina = zs[0]

    def centroid(z: float) -> np.ndarray:
        z = int(np.clip(round(z), zs[0], zs[-1]))
        xy = np.argwhere(trachea[:, :, z]).mean(axis=0)
        return np.array([xy[0], xy[1], z], dtype=float)

    # offsets in mm: x to the patient's right, y forwards, z up
    if station == "right paratracheal":
        c, off = centroid(carina + (12 + 18 * level) / sp[2]), (17.0, 3.0, 0.0)
    elif station == "left paratracheal":
        c, off = centroid(carina + (12 + 18 * level) / sp[2]), (-17.0, -3.0, 0.0)
    elif station == "aortopulmonary window":
        c, off = centroid(carina + (2 + 8 * level) / sp[2]), (-25.0, 8.0, 0.0)
    else:  # subcarinal: below the carina, between the main bronchi, in front of the esophagus
        c, off = centroid(carina), (0.0, -6.0, -(15.0 + 10.0 * level))
    return c + np.asarray(off) / sp


def _roomiest(cv: Canvas, point: np.ndarray, fat: np.ndarray, search_mm: float) -> np.ndarray:
    """The voxel near `point` deepest inside mediastinal fat (a node displaces fat, not organs)."""
    box = box_around(point, search_mm / cv.spacing, fat.shape)
    depth = ndi.distance_transform_edt(fat[box], sampling=cv.spacing)
    dx, dy, dz = offsets_mm(box, point, cv.spacing)
    score = depth - 0.15 * np.sqrt(dx**2 + dy**2 + dz**2)
    return np.array(np.unravel_index(np.argmax(score), score.shape), dtype=float) + [s.start for s in box]


def _plant_lymph(cv: Canvas, p: dict, rng):
    trachea = cv.organ("trachea")
    # mediastinal fat and soft tissue; contrast-filled vessels (some have no label) and air are excluded
    fat = (cv.labels == 0) & (cv.hu > -250) & (cv.hu < 150) & ~cv.claimed
    mask = np.zeros(cv.hu.shape, dtype=bool)
    found = []
    for station, short, elong, level in zip(
        p["stations"], p["short_mm"], p["elong"], p["level_mm"], strict=True
    ):
        point = _station_point(station, level, trachea, cv.spacing)
        if point is None or np.any(point < 0) or np.any(point >= cv.hu.shape):
            continue
        centre = _roomiest(cv, point, fat, 15.0)
        r = short / 2
        box, ell = ellipsoid(cv.hu.shape, cv.spacing, centre, np.array([r, r, r * elong]))
        # a node displaces fat and may bulge into the lung, never into vessels, airways or bone
        region = ell & (fat[box] | cv.lung()[box] & ~cv.claimed[box])
        # the reported size is the planted one only if most of the node fitted; else its equivalent
        # diameter, and a node that ends up under 10 mm is not planted at all (it would not be enlarged)
        size = short
        if region.sum() < 0.5 * ell.sum():
            size = 2 * (3 * region.sum() * np.prod(cv.spacing) / (4 * np.pi)) ** (1 / 3)
        if not region.any() or size < 10.0:
            continue
        texture = p["hu"] + 5.0 * smooth_field(region.shape, cv.spacing, 5.0, rng)
        cv.commit(region, texture, box)
        fat[box] &= ~region
        mask[box] |= region
        found.append({"station": station, "short_mm": round(size)})
    if not found:
        return None
    return mask, {"nodes": found, "largest_mm": max(n["short_mm"] for n in found)}


def _draw_material(rng, sites):
    return {
        "radius_mm": rng.uniform(1.0, 1.6),
        "hu": rng.uniform(1300.0, 2200.0),
        "extra_mm": rng.uniform(5.0, 20.0),
    }


def _plant_material(cv: Canvas, p: dict, rng):
    vein = cv.organ("superior_vena_cava", "brachiocephalic_vein_right")
    zs = np.flatnonzero(vein.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    # a central venous catheter along the right brachiocephalic vein and the SVC, tip near the atrium
    counts = vein.sum(axis=(0, 1))[zs]
    cx = (vein * np.arange(vein.shape[0])[:, None, None]).sum(axis=(0, 1))[zs] / counts
    cy = (vein * np.arange(vein.shape[1])[None, :, None]).sum(axis=(0, 1))[zs] / counts
    tip = max(zs[0] - round(p["extra_mm"] / cv.spacing[2]), 0)
    z = np.arange(tip, zs[-1] + 1)
    cx = np.interp(z, zs, cx)
    cy = np.interp(z, zs, cy)
    r = max(p["radius_mm"], 0.5 * cv.spacing[:2].max())
    xx = np.arange(cv.hu.shape[0])[:, None, None]
    yy = np.arange(cv.hu.shape[1])[None, :, None]
    box = (slice(None), slice(None), slice(int(z[0]), int(z[-1]) + 1))
    tube = ((xx - cx) * cv.spacing[0]) ** 2 + ((yy - cy) * cv.spacing[1]) ** 2 <= r**2
    tube &= ~cv.claimed[box]
    if not tube.any():
        return None
    cv.commit(tube, p["hu"], box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = tube
    return mask, {"device": "central venous catheter", "tip": "superior vena cava"}


# planting order matters: the heart grows before anything is placed around it, fluid before the
# lung lesions (which then avoid it), diffuse lung changes after focal ones
PLANTERS: dict[str, Planter] = {
    p.name: p
    for p in (
        Planter("Cardiomegaly", _draw_cardiomegaly, _plant_cardiomegaly),
        Planter("Coronary artery wall calcification", _draw_coronary, _plant_coronary),
        Planter("Pericardial effusion", _draw_pericardial, _plant_pericardial),
        Planter("Arterial wall calcification", _draw_aortic_calc, _plant_aortic_calc),
        Planter("Medical material", _draw_material, _plant_material),
        Planter("Lymphadenopathy", _draw_lymph, _plant_lymph),
        Planter("Pleural effusion", _draw_pleural, _plant_pleural),
        Planter("Atelectasis", _draw_atelectasis, _plant_atelectasis),
        Planter("Consolidation", _draw_consolidation, _plant_consolidation),
        Planter("Lung nodule", _draw_nodule, _plant_nodule),
        Planter("Lung opacity", _draw_opacity, _plant_opacity),
        Planter("Emphysema", _draw_emphysema, _plant_emphysema),
    )
}
PLANTABLE: tuple[str, ...] = tuple(PLANTERS)


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

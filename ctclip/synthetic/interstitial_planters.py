"""Planters of scarring and diffuse lung patterns: pulmonary fibrotic sequela (band-like scars),
interlobular septal thickening (a polygonal network) and mosaic attenuation (a geographic patchwork).

They run after the focal lung planters (the order and the draw/plant contract are in
`ctclip.synthetic.planters`) and change only lung that no earlier planter took. Sizes are in mm,
with a floor of about a voxel (lines) or a few voxels (cells, patches), so that each pattern still reads
at the benchmark's 5-6 mm voxels and keeps its radiological size on fine grids.
"""

from __future__ import annotations

import itertools

import numpy as np

from ctclip.synthetic.canvas import (
    LOBES,
    Canvas,
    bbox,
    box_between,
    depth_in_plane,
    offsets_mm,
    smooth_field,
)
from ctclip.synthetic.lung_planters import SIDE_LOBES, lobes_hit, side_of


def _sides(side: str) -> tuple[str, ...]:
    return ("right", "left") if side == "both" else (side,)


# ---- fibrotic sequela ---------------------------------------------------------------------------


def draw_fibrotic(rng, sites):
    bands = []
    for _ in range(int(rng.choice([2, 3, 4, 5], p=[0.15, 0.3, 0.3, 0.25]))):
        # post-infectious / post-tuberculous scars favour the upper lobes and the apices
        lobe = str(rng.choice(LOBES, p=[0.32, 0.12, 0.32, 0.08, 0.16]))
        cand = sites[lobe]
        z = cand[:, 2]
        upper = cand[(z >= z.min() + 0.45 * (z.max() - z.min())) & (cand[:, 3] <= 15.0)]
        upper = upper if len(upper) else cand
        bands.append(
            {
                "lobe": lobe,
                "anchor": upper[rng.integers(len(upper)), :3].tolist(),  # just under the pleura
                "toward": cand[:, :3].mean(axis=0).tolist(),  # the band runs inwards, to the lobe's core
                "turn": rng.uniform(-0.6, 0.6),
                "slope": rng.uniform(-0.5, 0.5),
                "bend": rng.uniform(-0.15, 0.15),
                "wave": [rng.uniform(0.8, 2.0), rng.uniform(20.0, 40.0), rng.uniform(0, 2 * np.pi)],
                "length_mm": rng.uniform(40.0, 75.0),
                "thick_mm": rng.uniform(4.0, 8.0),
                "height_mm": rng.uniform(15.0, 35.0),  # cranio-caudal: scars are plates, not threads
                "hu": rng.uniform(-120.0, 20.0),
            }
        )
    return {"bands": bands}


def plant_fibrotic(cv: Canvas, p: dict, rng):
    lung = cv.lung() & ~cv.claimed
    mask = np.zeros(cv.hu.shape, dtype=bool)
    count = 0
    min_half = 0.7 * cv.spacing[:2].max()  # at least a voxel wide, or the band breaks up
    for b in p["bands"]:
        a = (cv.base_to_out @ np.append(b["anchor"], 1.0))[:3]
        toward = (cv.base_to_out @ np.append(b["toward"], 1.0))[:3]
        if np.any(a < 0) or np.any(a >= cv.hu.shape):
            continue
        ang = np.arctan2(*((toward - a) * cv.spacing)[1::-1]) + b["turn"]
        e = np.array([np.cos(ang), np.sin(ang)])
        length, out = b["length_mm"], 20.0  # the band also runs outwards to the pleura
        amp, wavelength, phase = b["wave"]
        side = abs(b["bend"]) * length + amp + b["thick_mm"]  # how far the ribbon strays sideways
        reach = np.array([*(np.abs(e) * (length + out) + side), abs(b["slope"]) * length + b["height_mm"]])
        box = box_between(a, a, (reach + 2 * cv.spacing) / cv.spacing, cv.hu.shape)
        dx, dy, dz = offsets_mm(box, a, cv.spacing)
        along = dx * e[0] + dy * e[1]
        frac = np.clip(along / length, 0.0, 1.0)
        # a coarse, gently curved and wavy ribbon of uneven thickness, not a ruled line
        wave = np.sin(2 * np.pi * along / wavelength + phase)
        across = -dx * e[1] + dy * e[0] - b["bend"] * length * frac**2 - amp * wave
        up = dz - b["slope"] * along
        band = (
            (along >= -out)
            & (along <= length)
            & (np.abs(across) <= np.maximum(b["thick_mm"] / 2 * (1 - 0.5 * frac + 0.25 * wave), min_half))
            & (np.abs(up) <= np.maximum(b["height_mm"] / 2 * (1 - 0.6 * frac), 0.5 * cv.spacing[2]))
        )
        region = band & lung[box]
        if region.sum() < 3:
            continue
        cv.commit(region, b["hu"], box)
        lung[box] &= ~region
        mask[box] |= region
        count += 1
    if not count:
        return None
    return mask, {"lobes": lobes_hit(cv, mask), "count": count}


# ---- interlobular septal thickening -------------------------------------------------------------


def draw_septal(rng, sites):
    zone = str(rng.choice(["subpleural", "basal"], p=[0.6, 0.4]))
    return {
        "side": str(rng.choice(["both", "right", "left"], p=[0.8, 0.1, 0.1])),
        "zone": zone,
        "cell_mm": rng.uniform(12.0, 20.0),  # secondary pulmonary lobules, 1-2.5 cm
        "width_mm": rng.uniform(2.0, 4.0),
        "share": rng.uniform(0.65, 0.85),  # of the septa that are thickened (the others stay thin)
        # how deep under the pleura the network reaches, and the share of the lung height (from the
        # base) it covers: a subpleural rim over most of the lung, or the bases to a greater depth
        "depth_mm": rng.uniform(10.0, 18.0) if zone == "subpleural" else rng.uniform(22.0, 32.0),
        "height": rng.uniform(0.5, 0.7) if zone == "subpleural" else rng.uniform(0.3, 0.4),
        "hu": rng.uniform(-250.0, -100.0),
    }


def _septa(
    region: np.ndarray, spacing: np.ndarray, cell_mm: float, width_mm: float, share: float, rng
) -> np.ndarray:
    """The walls between polyhedral cells of about `cell_mm` (a jittered-grid Voronoi tessellation) inside
    `region`, `width_mm` thick as seen in the axial plane, a random `share` of them. Walls that lie flat
    in a slice are left out, so every slice shows a polygonal net rather than filled cells."""
    idx = np.argwhere(region)
    pts = (idx * spacing).astype(np.float32)
    cell = np.array([cell_mm, cell_mm, 1.3 * cell_mm])  # a little taller than wide: fewer flat walls
    g = np.floor(pts / cell).astype(int) + 1
    n = g.max(axis=0) + 2
    seeds = ((np.stack(np.indices(n), axis=-1) - 1 + rng.uniform(0.2, 0.8, (*n, 3))) * cell).reshape(-1, 3)
    seeds = seeds.astype(np.float32)
    coin = rng.random(len(seeds))
    px, py, pz = pts.T
    sx, sy, sz = seeds.T
    base = np.ravel_multi_index(g.T, n)
    d1 = np.full(len(pts), np.inf, dtype=np.float32)
    d2 = np.full(len(pts), np.inf, dtype=np.float32)
    i1 = np.zeros(len(pts), dtype=np.intp)
    i2 = np.zeros(len(pts), dtype=np.intp)
    # the two nearest seeds of every voxel, among the 27 cells around its own
    for off in itertools.product((-1, 0, 1), repeat=3):
        k = base + int(np.ravel_multi_index(np.add(off, 1), n)) - int(np.ravel_multi_index((1, 1, 1), n))
        d = (px - sx[k]) ** 2 + (py - sy[k]) ** 2 + (pz - sz[k]) ** 2
        first = d < d1
        second = ~first & (d < d2)
        d2 = np.where(first, d1, np.where(second, d, d2))
        i2 = np.where(first, i1, np.where(second, k, i2))
        d1 = np.where(first, d, d1)
        i1 = np.where(first, k, i1)
    # distance to the bisector plane of the two nearest seeds, measured within the slice
    gap = np.linalg.norm((seeds[i2] - seeds[i1])[:, :2], axis=1)
    inplane = (d2 - d1) / np.maximum(2 * gap, 1e-6)
    # a wall is thickened or not as a whole: a coin per pair of cells (symmetric in the pair)
    keep = (coin[i1] + coin[i2]) % 1.0 < share
    out = np.zeros(region.shape, dtype=bool)
    out[tuple(idx[(inplane <= width_mm / 2) & keep].T)] = True
    return out


def plant_septal(cv: Canvas, p: dict, rng):
    sides = _sides(p["side"])
    lung = cv.organ(*(lobe for s in sides for lobe in SIDE_LOBES[s]))
    zs = np.flatnonzero(lung.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    # the lower lung only: septal lines are basal predominant
    top = zs[0] + int(np.ceil(p["height"] * (zs[-1] - zs[0] + 1)))
    # a ring of non-lung around the box: the pleura is where the depths start
    box = bbox(lung[:, :, :top], margin=np.array([1, 1, 0]))
    sp = cv.spacing
    lb = lung[box]
    # at least about two voxels deep, so a coarse grid still shows lines across the band
    zone = lb & (depth_in_plane(lb, sp) <= max(p["depth_mm"], 2.5 * sp[:2].max()))
    # parenchyma only: vessels and earlier lesions keep their density
    zone &= ~cv.claimed[box] & (cv.hu[box] < -650)
    if not zone.any():
        return None
    # cells of at least ~4 voxels and lines of at least ~1 voxel, or the net fills in on coarse grids
    cell = max(p["cell_mm"], 3.8 * sp[:2].max())
    septa = _septa(zone, sp, cell, max(p["width_mm"], 0.9 * sp[:2].max()), p["share"], rng)
    if not septa.any():
        return None
    cv.commit(septa, p["hu"], box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = septa
    lobes = lobes_hit(cv, mask)
    return mask, {"lobes": lobes, "side": side_of(lobes), "zone": p["zone"]}


# ---- mosaic attenuation -------------------------------------------------------------------------


def draw_mosaic(rng, sites):
    return {
        "side": str(rng.choice(["both", "right", "left"], p=[0.8, 0.1, 0.1])),
        "extent": str(rng.choice(["lower", "diffuse"], p=[0.6, 0.4])),
        "patch_mm": rng.uniform(18.0, 32.0),
        "dark_share": rng.uniform(0.45, 0.6),
        "dark_hu": rng.uniform(-945.0, -915.0),  # air trapping / oligaemia
        "bright_hu": rng.uniform(-740.0, -700.0),  # relatively hyperperfused lobules
    }


def plant_mosaic(cv: Canvas, p: dict, rng):
    lobes = [
        lobe
        for s in _sides(p["side"])
        for lobe in SIDE_LOBES[s]
        if p["extent"] == "diffuse" or "upper" not in lobe
    ]
    region = cv.organ(*lobes) & ~cv.claimed
    box = bbox(region)
    if box is None:
        return None
    hu = cv.hu[box]
    r = region[box] & (hu < -650)  # parenchyma: vessels keep their density
    if r.sum() < 10:
        return None
    field = smooth_field(r.shape, cv.spacing, max(p["patch_mm"], 4.0 * cv.spacing[:2].max()), rng)
    # a sharp threshold gives the geographic, sharply demarcated patches
    dark = field < np.quantile(field[r], p["dark_share"])
    # the patches replace the lung density but keep a little of its texture
    values = np.where(dark, p["dark_hu"], p["bright_hu"]) + 0.3 * (hu + 860.0)
    cv.commit(r, values.astype(np.float32), box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = r
    hit = lobes_hit(cv, mask)
    return mask, {"lobes": hit, "side": side_of(hit)}

"""Planters of the mediastinum: enlarged lymph nodes and a hiatal hernia.

`draw_*(rng, sites)` runs once per patient, `plant_*(canvas, params, rng)` once per scan (the contract
is in `ctclip.synthetic.planters`). They run after the heart and vessels (`cardiovascular_planters`)
and before the lung planters; the hernia before the pleural fluid (both push lung aside).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctclip.synthetic.canvas import (
    LOBES,
    Canvas,
    bbox,
    box_around,
    ellipsoid,
    offsets_mm,
    smooth_field,
)
from ctclip.synthetic.cardiovascular_planters import HEART

STATIONS = (
    "right paratracheal",
    "subcarinal",
    "right hilar",
    "left hilar",
    "aortopulmonary window",
    "left paratracheal",
    "prevascular",
)
STATION_WEIGHTS = (0.17, 0.15, 0.22, 0.22, 0.08, 0.08, 0.08)  # hilar nodes show best against the lung
HILAR = ("right hilar", "left hilar")


def draw_lymph(rng, sites):
    # bulky nodes (short axis 20-35 mm, as in lymphoma or sarcoidosis), at two to five stations, some of
    # them conglomerates of two or three nodes; the hilar and subcarinal ones border the lung, so they show
    # against air even at 5.6 mm voxels (smaller nodes there look like the enhanced vessels beside them)
    n = int(rng.choice([2, 3, 4, 5], p=[0.3, 0.3, 0.25, 0.15]))
    stations = rng.choice(STATIONS, size=n, replace=False, p=STATION_WEIGHTS).tolist()
    return {
        "stations": stations,
        "short_mm": rng.uniform(20.0, 35.0, n).tolist(),
        "elong": rng.uniform(1.1, 1.5, n).tolist(),
        "level_mm": rng.uniform(0.0, 1.0, n).tolist(),
        # a conglomerate: extra nodes (0-2) beside the first, as (direction (3,), size factor) pairs
        "cluster": [
            [(rng.standard_normal(3).tolist(), float(rng.uniform(0.7, 1.0))) for _ in range(k)]
            for k in rng.choice([0, 1, 2], size=n, p=[0.55, 0.3, 0.15])
        ],
        "hu": rng.uniform(30.0, 55.0),
    }


def _station_point(station: str, level: float, trachea: np.ndarray, sp: np.ndarray) -> np.ndarray | None:
    """Where a node of `station` sits, from the trachea: its lowest slice is the carina."""
    zs = np.flatnonzero(trachea.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    carina = zs[0]

    def centroid(z: float) -> np.ndarray:
        z = int(zs[np.argmin(np.abs(zs - z))])  # the nearest slice that shows the trachea (a coarse grid has gaps)
        xy = np.argwhere(trachea[:, :, z]).mean(axis=0)
        return np.array([xy[0], xy[1], z], dtype=float)

    # offsets in mm: x to the patient's right, y forwards, z up
    if station == "right paratracheal":
        c, off = centroid(carina + (12 + 18 * level) / sp[2]), (17.0, 3.0, 0.0)
    elif station == "left paratracheal":
        c, off = centroid(carina + (12 + 18 * level) / sp[2]), (-17.0, -3.0, 0.0)
    elif station == "aortopulmonary window":
        c, off = centroid(carina + (2 + 8 * level) / sp[2]), (-25.0, 8.0, 0.0)
    elif station == "prevascular":  # in front of the aortic arch and the great vessels
        c, off = centroid(carina + (15 + 20 * level) / sp[2]), (0.0, 35.0, 0.0)
    else:  # subcarinal: below the carina, between the main bronchi, in front of the esophagus
        c, off = centroid(carina), (0.0, -6.0, -(15.0 + 10.0 * level))
    return c + np.asarray(off) / sp


def _hilar_point(cv: Canvas, station: str, level: float, trachea: np.ndarray) -> np.ndarray | None:
    """A hilar node's centre: on the medial border of the lung, 10-30 mm below the carina, level with it
    front to back (where the main bronchus and pulmonary artery enter the lung)."""
    zs = np.flatnonzero(trachea.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    sp = cv.spacing
    z = int(round(zs[0] - (10.0 + 20.0 * level) / sp[2]))
    if z < 0:
        return None
    cx, cy = np.argwhere(trachea[:, :, zs[0]]).mean(axis=0)
    right = station == "right hilar"
    lung = cv.organ(*(LOBES[2:] if right else LOBES[:2]))[:, :, z]
    xs, ys = np.nonzero(lung & (np.abs(np.arange(lung.shape[1]) - cy)[None, :] * sp[1] <= 20.0))
    if xs.size == 0:
        return None
    i = np.argmin(xs) if right else np.argmax(xs)  # the lung's most medial voxel there
    return np.array([xs[i], ys[i], z], dtype=float)


def _roomiest(
    cv: Canvas, point: np.ndarray, fat: np.ndarray, search_mm: float | np.ndarray, penalty: float = 0.15
) -> np.ndarray:
    """The voxel near `point` deepest inside mediastinal fat (a node displaces fat, not organs); every mm
    away from `point` costs `penalty` mm of depth."""
    box = box_around(point, search_mm / cv.spacing, fat.shape)
    depth = ndi.distance_transform_edt(fat[box], sampling=cv.spacing)
    dx, dy, dz = offsets_mm(box, point, cv.spacing)
    score = depth - penalty * np.sqrt(dx**2 + dy**2 + dz**2)
    return np.array(np.unravel_index(np.argmax(score), score.shape), dtype=float) + [s.start for s in box]


def plant_lymph(cv: Canvas, p: dict, rng):
    trachea = cv.organ("trachea")
    lung = cv.lung()
    # mediastinal fat and soft tissue; contrast-filled vessels (some have no label) and air are excluded
    fat = (cv.labels == 0) & (cv.hu > -250) & (cv.hu < 150) & ~cv.claimed
    # a node may bulge into the lung (a hilar node replaces lung at the hilum), never into its vessels
    soft_lung = lung & (cv.hu < 100) & ~cv.claimed
    mask = np.zeros(cv.hu.shape, dtype=bool)
    found = []
    for station, short, elong, level, cluster in zip(
        p["stations"], p["short_mm"], p["elong"], p["level_mm"], p["cluster"], strict=True
    ):
        r = short / 2
        if station in HILAR:
            centre = _hilar_point(cv, station, level, trachea)
            if centre is not None:  # centred a third of the radius into the lung (x grows to the right)
                centre[0] += (1 if station == "right hilar" else -1) * 0.3 * r / cv.spacing[0]
        else:
            point = _station_point(station, level, trachea, cv.spacing)
            inside = point is not None and np.all(point >= 0) and np.all(point < cv.hu.shape)
            centre = _roomiest(cv, point, fat, 15.0) if inside else None
        if centre is None:
            continue
        room = fat | soft_lung
        box, ell = ellipsoid(cv.hu.shape, cv.spacing, centre, np.array([r, r, r * elong]))
        region = ell & room[box]
        # the reported size is the planted one only if most of the node fitted; else its equivalent
        # diameter, and a node that ends up under 10 mm is not planted at all (it would not be enlarged)
        size = short
        if region.sum() < 0.5 * ell.sum():
            size = 2 * (3 * region.sum() * np.prod(cv.spacing) / (4 * np.pi)) ** (1 / 3)
        if not region.any() or size < 10.0:
            continue
        region_full = np.zeros(cv.hu.shape, dtype=bool)
        region_full[box] = region
        for direction, factor in cluster:  # matted nodes: neighbours overlapping the first by a third
            d = np.asarray(direction) / max(np.linalg.norm(direction), 1e-6)
            c2 = centre + 1.2 * r * d / cv.spacing
            b2, e2 = ellipsoid(cv.hu.shape, cv.spacing, c2, factor * np.array([r, r, r * elong]))
            region_full[b2] |= e2 & room[b2]
        box = bbox(region_full)
        region = region_full[box]
        texture = p["hu"] + 5.0 * smooth_field(region.shape, cv.spacing, 5.0, rng)
        cv.commit(region, texture, box)
        fat[box] &= ~region
        soft_lung[box] &= ~region
        mask[box] |= region
        found.append({"station": station, "short_mm": round(size)})
    if not found:
        return None
    return mask, {"nodes": found, "largest_mm": max(n["short_mm"] for n in found)}


# what a hiatal hernia may push aside: lung, mediastinal fat and the esophagus; never the heart, the
# aorta, the spine or the organs below the diaphragm (all labelled)
HERNIA_ROOM = ("esophagus", *LOBES)


def draw_hernia(rng, sites):
    # a sliding hernia large enough to read at 5-6 mm voxels (radiology: 3-6 cm, here 4.5-6.5 cm)
    return {
        "diameter_mm": rng.uniform(45.0, 65.0),
        "aspect": rng.uniform(0.75, 0.95, 2).tolist(),  # AP and cranio-caudal radius / transverse
        "fluid": rng.uniform(0.2, 0.45),  # share of the sac's content below the air-fluid level
        "wall_mm": rng.uniform(3.0, 5.0),
        "wall_hu": rng.uniform(25.0, 50.0),
        "fluid_hu": rng.uniform(5.0, 20.0),
    }


def plant_hernia(cv: Canvas, p: dict, rng):
    eso = cv.organ("esophagus")
    heart = cv.organ(*HEART)
    ez = np.flatnonzero(eso.any(axis=(0, 1)))
    hz = np.flatnonzero(heart.any(axis=(0, 1)))
    if ez.size == 0 or hz.size == 0:
        return None
    r = p["diameter_mm"] / 2
    radii = np.array([r, r * p["aspect"][0], r * p["aspect"][1]])
    # the sac sits on the diaphragm behind the lowest part of the heart (the esophagus label itself runs
    # on below the diaphragm to the stomach), around the esophagus at that level
    z = int(min(max(hz[0] + 0.5 * radii[2] / cv.spacing[2], ez[0]), ez[-1]))
    xy = np.argwhere(eso[:, :, ez[np.argmin(np.abs(ez - z))]]).mean(axis=0)
    point = np.array([xy[0], xy[1], z], dtype=float)
    # lung, fat and the esophagus above the gastro-esophageal junction (the esophagus label's lowest
    # slice, at the hiatus): never the stomach or the fat below, which would be abdomen, not a hernia
    room = (cv.organ(*HERNIA_ROOM) | (cv.labels == 0) & (cv.hu < 150)) & ~cv.claimed
    room[:, :, : ez[0]] = False
    # where the heart and aorta leave little room, the sac bulges into the lower lobes beside them
    centre = _roomiest(cv, point, room, np.array([0.7 * r, 0.7 * r, 0.0]), penalty=0.25)
    centre[2] = point[2]
    box, ell = ellipsoid(cv.hu.shape, cv.spacing, centre, radii)
    region = ell & room[box]
    if region.sum() < 0.3 * ell.sum():
        return None
    # a gastric wall around gas, with fluid layering posteriorly (supine: the level is a coronal plane);
    # a voxel centre's distance to the outside is at least one voxel, hence the half voxel
    depth = ndi.distance_transform_edt(np.pad(region, 1), sampling=cv.spacing)[1:-1, 1:-1, 1:-1]
    wall = region & (depth <= max(p["wall_mm"] + 0.5 * cv.spacing[:2].min(), 1.01 * cv.spacing[:2].max()))
    inside = region & ~wall
    values = np.full(region.shape, -1000.0, dtype=np.float32)
    if inside.any():
        # the level leaves the dependent `fluid` share of the content below it
        level = np.quantile(np.nonzero(inside)[1], p["fluid"])
        values[:, : int(np.floor(level)) + 1, :] = p["fluid_hu"]
    values[wall] = p["wall_hu"]
    cv.commit(region, values, box)
    cv.labels[box][region] = cv.ids["stomach"]  # it is stomach now: lung planters after it leave it alone
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = region
    xs, ys = np.flatnonzero(region.any(axis=(1, 2))), np.flatnonzero(region.any(axis=(0, 2)))
    size = max(len(xs) * cv.spacing[0], len(ys) * cv.spacing[1])
    return mask, {"size_mm": round(float(size)), "kind": "sliding"}

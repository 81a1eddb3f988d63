"""Planters of the heart, vessels and mediastinum: cardiomegaly, coronary and aortic calcification,
pericardial effusion, enlarged mediastinal lymph nodes, a central venous catheter and a hiatal hernia.

`draw_*(rng, sites)` runs once per patient, `plant_*(canvas, params, rng)` once per scan (the contract
is in `ctclip.data.synthetic_findings`). These run before the lung planters, cardiomegaly first of all:
the heart grows before anything is placed around it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctclip.data.synthetic_canvas import (
    LOBES,
    Canvas,
    bbox,
    box_around,
    distance_outside,
    ellipsoid,
    offsets_mm,
    seeded_specks,
    smooth_field,
)

HEART = ("heart", "atrial_appendage_left")


def draw_cardiomegaly(rng, sites):
    return {
        "scale": rng.uniform(1.2, 1.35),
        "anchor_back": rng.uniform(0.25, 0.45),
        "anchor_right": rng.uniform(0.1, 0.3),
    }


def plant_cardiomegaly(cv: Canvas, p: dict, rng):
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


def draw_coronary(rng, sites):
    return {"n": int(rng.integers(2, 7)), "radius_mm": (1.2, 2.5), "hu": rng.uniform(450, 900)}


def plant_coronary(cv: Canvas, p: dict, rng):
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


def draw_pericardial(rng, sites):
    return {"thickness_mm": rng.uniform(5.0, 12.0), "hu": rng.uniform(5.0, 18.0)}


def plant_pericardial(cv: Canvas, p: dict, rng):
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


def draw_aortic_calc(rng, sites):
    return {"n": int(rng.integers(4, 14)), "radius_mm": (1.5, 4.0), "hu": rng.uniform(650, 1100)}


def plant_aortic_calc(cv: Canvas, p: dict, rng):
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


def draw_lymph(rng, sites):
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


def draw_material(rng, sites):
    return {
        "radius_mm": rng.uniform(1.0, 1.6),
        "hu": rng.uniform(1300.0, 2200.0),
        "extra_mm": rng.uniform(5.0, 20.0),
    }


def plant_material(cv: Canvas, p: dict, rng):
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

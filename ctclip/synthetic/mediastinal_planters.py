"""Planters of the heart, vessels and mediastinum: cardiomegaly, coronary and aortic calcification,
pericardial effusion, enlarged mediastinal lymph nodes, a central venous catheter and a hiatal hernia.

`draw_*(rng, sites)` runs once per patient, `plant_*(canvas, params, rng)` once per scan (the contract
is in `ctclip.synthetic.planters`). These run before the lung planters, cardiomegaly first of all:
the heart grows before anything is placed around it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctclip.synthetic.canvas import (
    LOBES,
    Canvas,
    bbox,
    box_around,
    centreline,
    distance_outside,
    ellipsoid,
    front_surface,
    offsets_mm,
    pick_voxel,
    polyline,
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


# where the three coronary arteries run on the heart's surface: (start, end) of (angle around the heart's
# axis from anterior towards the patient's left, in degrees; height between the heart's lowest (0) and
# highest (1) slice). The left anterior descending artery runs down the anterior interventricular groove
# towards the apex, the circumflex artery posteriorly in the left and the right coronary artery in the
# right atrioventricular groove, down to the inferior surface.
CORONARY_COURSES = {
    "left anterior descending artery": ((30.0, 0.8), (70.0, 0.12)),
    "circumflex artery": ((65.0, 0.78), (150.0, 0.45)),
    "right coronary artery": ((-25.0, 0.8), (-135.0, 0.15)),
}


def draw_coronary(rng, sites):
    # calcified plaques along one to three arteries, the LAD most often; with dense calcium (600-1500 HU)
    # a plaque stays bright in a 5.6 mm voxel, and a continuous calcified segment spans several
    names = list(CORONARY_COURSES)
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    vessels = sorted(rng.choice(names, size=k, replace=False, p=[0.6, 0.15, 0.25]).tolist(), key=names.index)
    plaques = {}
    for v in vessels:
        spots = [(float(t), float(rng.uniform(2.0, 6.0))) for t in rng.uniform(0.0, 1.0, int(rng.integers(3, 8)))]
        if rng.random() < 0.5:  # a continuous calcified segment, 15-35 mm long
            spots.append((float(rng.uniform(0.0, 0.6)), float(rng.uniform(7.5, 17.5))))
        plaques[v] = spots  # (where along the course 0..1, half length in mm)
    return {"plaques": plaques, "radius_mm": (1.5, 3.0), "hu": rng.uniform(600.0, 1500.0)}


def _course_anchors(
    fat_pts: np.ndarray, fat_angle: np.ndarray, zs: np.ndarray, course: tuple, sp: np.ndarray
) -> np.ndarray:
    """Voxels (rows of `fat_pts`) of the epicardial fat band that follow one coronary course, in order."""
    (a0, h0), (a1, h1) = course
    z0, z1 = zs[0], zs[-1]
    length = abs(h1 - h0) * (z1 - z0) * sp[2] + np.deg2rad(abs(a1 - a0)) * 40.0  # about, in mm
    t = np.linspace(0.0, 1.0, int(np.clip(length / (0.5 * sp.min()), 8, 400)))
    ang = np.deg2rad(a0 + (a1 - a0) * t)
    zk = np.round(z0 + (h0 + (h1 - h0) * t) * (z1 - z0)).astype(int)
    out = []
    for a, z in zip(ang, zk, strict=True):
        on = np.flatnonzero(fat_pts[:, 2] == z)
        if on.size == 0:
            continue
        diff = np.abs(np.angle(np.exp(1j * (fat_angle[on] - a))))
        best = on[np.argmin(diff)]
        if diff.min() <= np.deg2rad(30.0) and (not out or out[-1] != best):
            out.append(best)
    return np.asarray(out, dtype=int)


def plant_coronary(cv: Canvas, p: dict, rng):
    heart = cv.organ(*HEART)
    m = np.ceil(6.0 / cv.spacing).astype(int) + 1
    box = bbox(heart, margin=m * [1, 1, 0])
    if box is None:
        return None
    h = heart[box]
    band = max(2.5, 1.01 * cv.spacing[:2].max())
    # the arteries run in the epicardial fat just outside the heart's contour
    fat = (
        ~h & (distance_outside(h, cv.spacing, step_mm=1.0) <= band) & (cv.labels[box] == 0) & ~cv.claimed[box]
    )
    zs = np.flatnonzero(h.any(axis=(0, 1)))
    pts = np.argwhere(fat)
    if pts.size == 0 or zs.size < 2:
        return None
    # each fat voxel's angle around the heart's centre in its slice (0 anterior, +90 the patient's left)
    n = np.maximum(h.sum(axis=(0, 1)), 1)
    cx = (h * np.arange(h.shape[0])[:, None, None]).sum(axis=(0, 1)) / n
    cy = (h * np.arange(h.shape[1])[None, :, None]).sum(axis=(0, 1)) / n
    dx = (pts[:, 0] - cx[pts[:, 2]]) * cv.spacing[0]
    dy = (pts[:, 1] - cy[pts[:, 2]]) * cv.spacing[1]
    angle = np.arctan2(-dx, dy)
    specks = np.zeros(h.shape, dtype=bool)
    found = []
    for vessel, spots in p["plaques"].items():
        anchors = _course_anchors(pts, angle, zs, CORONARY_COURSES[vessel], cv.spacing)
        if anchors.size == 0:
            continue
        # position along the course (mm), then the anchors each plaque covers
        steps = np.linalg.norm(np.diff(pts[anchors] * cv.spacing, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(steps)])
        seeds = np.zeros(h.shape, dtype=bool)
        for t, half in spots:
            hit = anchors[np.abs(arc - t * arc[-1]) <= half]
            hit = hit if hit.size else anchors[[np.argmin(np.abs(arc - t * arc[-1]))]]
            seeds[tuple(pts[hit].T)] = True
        plaque = seeded_specks(fat, cv.spacing, int(seeds.sum()), p["radius_mm"], rng, candidates=seeds)
        plaque &= ~specks
        if plaque.any():
            specks |= plaque
            found.append(vessel)
    if not found:
        return None
    values = p["hu"] * (1.0 + 0.12 * np.clip(smooth_field(h.shape, cv.spacing, 6.0, rng), -1.5, 1.5))
    cv.commit(specks, values, box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = specks
    vessel = found[0] if len(found) == 1 else ", ".join(found[:-1]) + " and " + found[-1]
    return mask, {"vessel": vessel}


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
    # many plaques along the arch and the descending aorta, some of them continuous calcified segments a
    # few centimetres long; dense calcium (600-1500 HU) stays bright in a 5.6 mm voxel
    segments = [
        (float(rng.uniform(5.0, 10.0)), float(rng.uniform(10.0, 25.0))) for _ in range(int(rng.integers(0, 4)))
    ]
    return {
        "n": int(rng.integers(12, 36)),
        "radius_mm": (2.0, 4.5),
        "segments": segments,  # (half width around the wall, half length along z) in mm
        "hu": rng.uniform(600.0, 1500.0),
    }


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
    for half_w, half_z in p["segments"]:
        seed = pick_voxel(rim, rng)
        if seed is None:
            break
        sub, ell = ellipsoid(rim.shape, cv.spacing, seed, np.array([half_w, half_w, half_z]))
        ell[tuple((seed - [s.start for s in sub]).astype(int))] = True
        specks[sub] |= ell & rim[sub]
    if not specks.any():
        return None
    values = p["hu"] * (1.0 + 0.12 * np.clip(smooth_field(a.shape, cv.spacing, 8.0, rng), -1.5, 1.5))
    cv.commit(specks, values, box)
    zs = np.flatnonzero(specks.any(axis=(0, 1)))
    span = (zs[-1] - zs[0] + 1) * cv.spacing[2]
    extent = "extensive" if len(p["segments"]) >= 2 and span >= 60 else "scattered" if span > 25 else "focal"
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = specks
    return mask, {"where": "thoracic aorta", "extent": extent}


STATIONS = (
    "right paratracheal",
    "subcarinal",
    "right hilar",
    "left hilar",
    "aortopulmonary window",
    "left paratracheal",
    "prevascular",
)
STATION_WEIGHTS = (0.2, 0.2, 0.17, 0.17, 0.1, 0.08, 0.08)
HILAR = ("right hilar", "left hilar")


def draw_lymph(rng, sites):
    # bulky nodes (short axis 15-30 mm), at one to five stations, some of them conglomerates of two or three
    # nodes; the hilar and subcarinal ones border the lung, so they show against air even at 5.6 mm voxels
    n = int(rng.choice([1, 2, 3, 4, 5], p=[0.1, 0.3, 0.3, 0.2, 0.1]))
    stations = rng.choice(STATIONS, size=n, replace=False, p=STATION_WEIGHTS).tolist()
    return {
        "stations": stations,
        "short_mm": rng.uniform(15.0, 30.0, n).tolist(),
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


DEVICES = ("cardiac pacemaker", "central venous catheter", "port catheter", "sternotomy wires")


def draw_material(rng, sites):
    """One device, with CT-RATE's variety under "medical material": a pacemaker (or defibrillator) with its
    leads, a central venous catheter, a port catheter with its chamber in the chest wall, or the wires
    of a median sternotomy. Metal reads 2000-3000 HU, catheters 1300-2200 HU."""
    kind = str(rng.choice(DEVICES, p=[0.35, 0.25, 0.2, 0.2]))
    p = {"kind": kind, "side": str(rng.choice(["left", "right"], p=[0.75, 0.25]))}
    if kind == "cardiac pacemaker":
        icd = bool(rng.random() < 0.3)  # an implantable cardioverter-defibrillator: larger, a thicker lead
        p |= {
            "icd": icd,
            "size_mm": [rng.uniform(45.0, 55.0), rng.uniform(40.0, 50.0) * (1.15 if icd else 1.0)],  # x, z
            "thick_mm": rng.uniform(10.0, 13.0) if icd else rng.uniform(6.0, 9.0),
            "depth_mm": rng.uniform(8.0, 13.0),  # under the skin, to the generator's middle
            "lateral_mm": rng.uniform(55.0, 85.0),  # from the midline
            "below_mm": rng.uniform(15.0, 35.0),  # from the clavicle to the generator's top
            "leads": 1 if icd else int(rng.choice([1, 2], p=[0.4, 0.6])),  # the second one to the atrium
            "lead_mm": rng.uniform(1.6, 2.2) if icd else rng.uniform(1.0, 1.5),
            "hu": rng.uniform(2200.0, 3000.0),
            "lead_hu": rng.uniform(2000.0, 2800.0),
        }
    elif kind == "central venous catheter":
        p |= {
            "side": str(rng.choice(["left", "right"], p=[0.5, 0.5])),
            "tip": str(rng.choice(["superior vena cava", "cavoatrial junction", "right atrium"])),
            "radius_mm": rng.uniform(1.3, 2.2),
            "hu": rng.uniform(1300.0, 2200.0),
        }
    elif kind == "port catheter":
        p |= {
            "side": str(rng.choice(["right", "left"], p=[0.75, 0.25])),
            "size_mm": [rng.uniform(26.0, 34.0)] * 2,
            "thick_mm": rng.uniform(10.0, 14.0),
            "depth_mm": rng.uniform(8.0, 12.0),
            "lateral_mm": rng.uniform(45.0, 70.0),
            "below_mm": rng.uniform(15.0, 40.0),
            "tip": str(rng.choice(["superior vena cava", "cavoatrial junction"])),
            "radius_mm": rng.uniform(1.0, 1.5),
            "hu": rng.uniform(2200.0, 3000.0),
            "lead_hu": rng.uniform(1300.0, 2200.0),
        }
    else:
        p |= {"n": int(rng.integers(4, 8)), "hu": rng.uniform(2200.0, 3000.0)}
    return p


VEINS = ("superior_vena_cava", "brachiocephalic_vein_left", "brachiocephalic_vein_right")
# where the wire of a device may run: veins, heart, and unlabelled soft tissue (never lung or bone)
DEVICE_ROOM = (*VEINS, *HEART)


def _vein_route(cv: Canvas, side: str) -> np.ndarray | None:
    """Centreline points (voxels) from the lateral end of the `side` brachiocephalic vein through it and the
    superior vena cava down to the cavoatrial junction (the SVC's lowest slice)."""
    step = max(1.0, 4.0 / cv.spacing.min())
    svc = centreline(cv.organ("superior_vena_cava"), step)
    if svc is None:
        return None
    svc = svc[::-1] if svc[0, 2] < svc[-1, 2] else svc
    bcv = centreline(cv.organ(f"brachiocephalic_vein_{side}"), step)
    if bcv is None:
        return svc
    if np.linalg.norm(bcv[0] - svc[0]) < np.linalg.norm(bcv[-1] - svc[0]):
        bcv = bcv[::-1]  # lateral end first
    return np.concatenate([bcv, svc])


def _heart_targets(cv: Canvas) -> tuple[np.ndarray, np.ndarray] | None:
    """(right ventricular apex, right atrial appendage) in voxels: the most anterior part of the heart's
    lowest third, and the most right-anterior part of its upper half."""
    pts = np.argwhere(cv.organ(*HEART)).astype(float)
    if len(pts) < 10:
        return None
    z0, z1 = pts[:, 2].min(), pts[:, 2].max()
    low = pts[pts[:, 2] <= z0 + 0.35 * (z1 - z0)]
    apex = low[low[:, 1] >= np.quantile(low[:, 1], 0.85)].mean(axis=0)
    up = pts[pts[:, 2] >= z0 + 0.5 * (z1 - z0)]
    score = up[:, 0] * cv.spacing[0] + 0.6 * up[:, 1] * cv.spacing[1]
    atrium = up[score >= np.quantile(score, 0.95)].mean(axis=0)
    return apex, atrium


def _wall_pocket(cv: Canvas, p: dict, body: np.ndarray, midline_x: float) -> tuple[np.ndarray, np.ndarray] | None:
    """A flat device under the skin of the upper anterior chest (a pacemaker generator, a port chamber):
    a rounded rectangle `size_mm` (x, z) and `thick_mm` thick, its middle `depth_mm` under the skin,
    `lateral_mm` from the midline on `side`, its top `below_mm` under the clavicle. Returns (mask, the
    voxel where the wire leaves it: its upper medial corner)."""
    sp, shape = cv.spacing, cv.hu.shape
    sign = 1.0 if p["side"] == "right" else -1.0  # x grows to the patient's right
    clav = np.flatnonzero(cv.organ(f"clavicula_{p['side']}").any(axis=(0, 1)))
    sternum = np.flatnonzero(cv.organ("sternum").any(axis=(0, 1)))
    if clav.size:
        top = clav[0] - p["below_mm"] / sp[2]
    elif sternum.size:
        top = sternum[-1] - p["below_mm"] / sp[2]
    else:
        return None
    half = np.asarray(p["size_mm"]) / 2
    cx, cz = midline_x + sign * p["lateral_mm"] / sp[0], top - half[1] / sp[2]
    xs, zs = np.arange(shape[0]), np.arange(shape[2])
    u = ((xs - cx) * sp[0] / half[0])[:, None]
    v = ((zs - cz) * sp[2] / half[1])[None, :]
    face = np.abs(u) ** 4 + np.abs(v) ** 4 <= 1.0  # (x, z): a rounded rectangle
    face[int(np.clip(round(cx), 0, shape[0] - 1)), int(np.clip(round(cz), 0, shape[2] - 1))] = True
    skin = front_surface(body)  # (x, z)
    ys = np.arange(shape[1])[None, :, None]
    depth = (skin[:, None, :] - ys) * sp[1]  # mm under the skin
    half_t = max(p["thick_mm"] / 2, 0.501 * sp[1])
    pocket = face[:, None, :] & (skin[:, None, :] >= 0) & (np.abs(depth - p["depth_mm"]) <= half_t)
    pocket &= (cv.labels == 0) & body & ~cv.claimed
    if not pocket.any():
        return None
    ex = int(np.clip(round(cx - sign * 0.6 * half[0] / sp[0]), 0, shape[0] - 1))
    ez = int(np.clip(round(cz + 0.6 * half[1] / sp[2]), 0, shape[2] - 1))
    ey = skin[ex, ez] - p["depth_mm"] / sp[1] if skin[ex, ez] >= 0 else np.argwhere(pocket)[:, 1].mean()
    return pocket, np.array([ex, ey, ez], dtype=float)


def _wire(cv: Canvas, points: list[np.ndarray], radius_mm: float) -> np.ndarray:
    """A lead or catheter along `points` (voxels), kept to veins, heart and unlabelled soft tissue."""
    line = polyline(cv.hu.shape, cv.spacing, np.asarray(points), radius_mm)
    room = cv.organ(*DEVICE_ROOM) | (cv.labels == 0) & (cv.hu > -500)
    return line & room & ~cv.claimed


def _subcutaneous_entry(cv: Canvas, exit_: np.ndarray, vein_start: np.ndarray, skin: np.ndarray) -> list:
    """From a chest-wall device up under the skin towards the base of the neck, then down into the vein
    (the subclavian or jugular puncture)."""
    sp = cv.spacing
    x = exit_[0] + 0.6 * (vein_start[0] - exit_[0])
    z = min(vein_start[2] + 15.0 / sp[2], cv.hu.shape[2] - 1)
    xi, zi = int(round(x)), int(round(z))
    y = skin[xi, zi] - 10.0 / sp[1] if skin[xi, zi] >= 0 else exit_[1]
    return [exit_, np.array([x, y, z]), vein_start]


def _sternotomy(cv: Canvas, p: dict) -> np.ndarray | None:
    """Cerclage wires of a median sternotomy: loops hugging the sternum in `n` axial planes along its body,
    each twisted shut in front of it."""
    st = cv.organ("sternum")
    zs = np.flatnonzero(st.any(axis=(0, 1)))
    if zs.size == 0:
        return None
    levels = np.unique(np.round(np.linspace(zs[0] + 0.08 * (zs[-1] - zs[0]), zs[-1] - 0.12 * (zs[-1] - zs[0]), p["n"])))
    box = bbox(st, margin=np.ceil(6.0 / cv.spacing).astype(int) + 1)
    out = np.zeros(cv.hu.shape, dtype=bool)
    width = max(1.5, 1.01 * cv.spacing[:2].max())
    allowed = (cv.labels[box] == 0) | cv.lung()[box] | cv.organ("costal_cartilages")[box]
    for z in levels.astype(int):
        k = z - box[2].start
        plane = st[box][:, :, k]
        d = ndi.distance_transform_edt(~plane, sampling=cv.spacing[:2])
        ring = (d > 0) & (d <= width) & allowed[:, :, k] & ~cv.claimed[box][:, :, k]
        # the twisted ends, a knot of about 5 mm in front of the sternum's midline
        xs, ys = np.nonzero(plane)
        kx, ky = xs.mean(), min(ys.max() + 1, plane.shape[1] - 1)
        gx = (np.arange(plane.shape[0])[:, None] - kx) * cv.spacing[0]
        gy = (np.arange(plane.shape[1])[None, :] - ky) * cv.spacing[1]
        knot = (gx**2 + gy**2 <= 2.5**2) & allowed[:, :, k] & ~plane
        knot[int(round(kx)), ky] = not plane[int(round(kx)), ky]
        out[box[0], box[1], z] |= ring | knot & ~cv.claimed[box][:, :, k]
    return out if out.any() else None


def plant_material(cv: Canvas, p: dict, rng):
    kind = p.get("kind", "central venous catheter")
    if kind == "sternotomy wires":
        wires = _sternotomy(cv, p)
        if wires is None:
            return None
        cv.commit(wires, p["hu"])
        return wires, {"device": "sternotomy wires"}
    route = _vein_route(cv, p["side"])
    targets = _heart_targets(cv)
    if route is None or targets is None:
        return None
    apex, atrium = targets
    body = ndi.binary_fill_holes(cv.hu > -400, structure=np.ones((3, 3, 1), dtype=bool))
    sternum = cv.organ("sternum")
    midline = np.argwhere(sternum)[:, 0].mean() if sternum.any() else np.argwhere(body)[:, 0].mean()
    skin = front_surface(body)
    cavoatrial = route[-1]
    if kind == "cardiac pacemaker":
        pocket = _wall_pocket(cv, p, body, midline)
        if pocket is None:
            return None
        generator, exit_ = pocket
        # through the atrium (below the cavoatrial junction) and the tricuspid valve to the apex
        ra = cavoatrial - [0.0, 0.0, 20.0 / cv.spacing[2]]
        path = [*_subcutaneous_entry(cv, exit_, route[0], skin), *route, ra]
        leads = _wire(cv, [*path, apex], p["lead_mm"])
        tip = "right ventricle"
        if p["leads"] == 2:
            leads |= _wire(cv, [*path[:-1], atrium], p["lead_mm"])
            tip = "right atrium and right ventricle"
        leads &= ~generator
        cv.commit(generator, p["hu"])
        cv.commit(leads, p["lead_hu"])
        device = "implantable cardioverter-defibrillator" if p["icd"] else "cardiac pacemaker"
        return generator | leads, {"device": device, "tip": tip}
    down = {"superior vena cava": 15.0, "cavoatrial junction": 0.0, "right atrium": -15.0}[p["tip"]]
    end = cavoatrial + [0.0, 0.0, down / cv.spacing[2]]
    route = route[route[:, 2] >= end[2]]
    if kind == "port catheter":
        pocket = _wall_pocket(cv, p, body, midline)
        if pocket is None:
            return None
        chamber, exit_ = pocket
        line = _wire(cv, [*_subcutaneous_entry(cv, exit_, route[0], skin), *route, end], p["radius_mm"])
        line &= ~chamber
        cv.commit(chamber, p["hu"])
        cv.commit(line, p["lead_hu"])
        return chamber | line, {"device": "port catheter", "tip": p["tip"]}
    # a central venous catheter from the jugular vein at the top of the scan (straight down the neck)
    top = route[0] + [0.0, 0.0, max(cv.hu.shape[2] - 1 - route[0][2], 0.0)]
    line = _wire(cv, [top, *route, end], p["radius_mm"])
    if not line.any():
        return None
    cv.commit(line, p["hu"])
    return line, {"device": "central venous catheter", "tip": p["tip"]}


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

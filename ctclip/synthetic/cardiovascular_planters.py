"""Planters of the heart and vessels: cardiomegaly, coronary artery calcification, pericardial effusion
and aortic wall calcification.

`draw_*(rng, sites)` runs once per patient, `plant_*(canvas, params, rng)` once per scan (the contract
is in `ctclip.synthetic.planters`). These run before every other planter, cardiomegaly first of all:
the heart grows before anything is placed around it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctclip.synthetic.canvas import (
    Canvas,
    bbox,
    distance_outside,
    ellipsoid,
    pick_voxel,
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

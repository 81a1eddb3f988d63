"""Planters of the airways: bronchiectasis and peribronchial thickening.

The base CT's own bronchi are not labelled and vanish on coarse grids, so both draw synthetic bronchial
trees (`Tube`s): from the hilum (beside the carina, the trachea label's lowest slice) down and out
into the lower lobes, towards peripheral sites of the base lung chosen per patient (`draw_*`), so that
every scan of a patient shows the same airways. Walls and lumens are drawn only into lung that no earlier
planter took (the order and the draw/plant contract are in `ctclip.synthetic.planters`).
"""

from __future__ import annotations

import numpy as np

from ctclip.synthetic.canvas import Canvas, Tube, bbox, draw_tubes
from ctclip.synthetic.lung_planters import SIDE_LOBES, lobes_hit, side_of

LOWER = {"right": "lung_lower_lobe_right", "left": "lung_lower_lobe_left"}
FRONT = {"right": "lung_middle_lobe_right", "left": "lung_upper_lobe_left"}
AIR_HU = -1000.0


def _side_draw(rng) -> str:
    return str(rng.choice(["both", "right", "left"], p=[0.6, 0.25, 0.15]))


def _peripheral_sites(
    rng, sites, lobe: str, n: int, depth_mm: tuple[float, float], share: float = 0.67
) -> list[list[float]]:
    """`n` base voxels of `lobe` at `depth_mm` under the pleura, in the lowest `share` of its height."""
    cand = sites[lobe]
    z = cand[:, 2]
    low = z <= z.min() + share * (z.max() - z.min())
    pick = cand[low & (cand[:, 3] >= depth_mm[0]) & (cand[:, 3] <= depth_mm[1])]
    if len(pick) == 0:
        pick = cand
    return pick[rng.choice(len(pick), size=n, replace=len(pick) < n), :3].tolist()


def _hilum_and_core(cv: Canvas, sides: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per side: the hilum (beside and below the carina) and the core of its lower lobe, voxel coords."""
    zs = np.flatnonzero((cv.labels == cv.ids["trachea"]).any(axis=(0, 1)))
    if zs.size == 0:
        return {}
    carina = np.array([*np.argwhere(cv.labels[:, :, zs[0]] == cv.ids["trachea"]).mean(axis=0), zs[0]])
    out = {}
    for side in sides:
        lobe = cv.labels == cv.ids[LOWER[side]]
        lz = np.flatnonzero(lobe.any(axis=(0, 1)))
        if lz.size == 0:
            continue
        lateral = 25.0 if side == "right" else -25.0  # x grows to the patient's right
        hilum = carina + np.array([lateral, -5.0, -15.0]) / cv.spacing
        # the lower-lobe bronchus runs down and back: its core is the lobe's centre 3-6 cm below the hilum
        z0 = int(np.clip(hilum[2] - 60.0 / cv.spacing[2], lz[0], lz[-1]))
        z1 = int(np.clip(hilum[2] - 30.0 / cv.spacing[2], z0, lz[-1]))
        core = np.argwhere(lobe[:, :, z0 : z1 + 1]).mean(axis=0) + [0.0, 0.0, z0]
        out[side] = (hilum, core)
    return out


def _to_out(cv: Canvas, site: list[float]) -> np.ndarray:
    return (cv.base_to_out @ np.append(site, 1.0))[:3]


def _commit_airways(cv: Canvas, wall: np.ndarray, lumen: np.ndarray, wall_hu: float) -> None:
    box = bbox(wall | lumen)
    cv.commit(lumen[box], AIR_HU, box)
    cv.commit(wall[box], wall_hu, box)


def _room(cv: Canvas, sides: tuple[str, ...]) -> np.ndarray:
    return cv.organ(*(lobe for s in sides for lobe in SIDE_LOBES[s])) & ~cv.claimed


def draw_peribronchial(rng, sites):
    side = _side_draw(rng)
    sides = ("right", "left") if side == "both" else (side,)
    return {
        "side": side,
        "lumen_mm": rng.uniform(5.0, 9.0),  # diameter at the hilum
        "wall_mm": rng.uniform(3.0, 6.0),
        "reach": rng.uniform(0.6, 0.8),  # how far towards the periphery the branches run
        "targets": {s: _peripheral_sites(rng, sites, LOWER[s], 5, (10.0, 30.0)) for s in sides},
        # and one bronchus forwards, to the middle lobe or the lingula (lower third of the left upper lobe)
        "front": {s: _peripheral_sites(rng, sites, FRONT[s], 1, (10.0, 30.0), 0.35)[0] for s in sides},
        "hu": rng.uniform(0.0, 40.0),
    }


def plant_peribronchial(cv: Canvas, p: dict, rng):
    sides = ("right", "left") if p["side"] == "both" else (p["side"],)
    # the walls must stay a visible ring around the lumen on coarse grids (about a voxel at least)
    wall_mm = max(p["wall_mm"], 0.8 * cv.spacing[:2].max())
    r = p["lumen_mm"] / 2
    tubes = []
    for s, (hilum, core) in _hilum_and_core(cv, sides).items():
        tubes.append(Tube(hilum, core, (r, 0.85 * r), wall_mm))
        for site in p["targets"][s]:
            end = core + p["reach"] * (_to_out(cv, site) - core)
            tubes.append(Tube(core, end, (0.85 * r, 0.6 * r), 0.85 * wall_mm))
        end = hilum + p["reach"] * (_to_out(cv, p["front"][s]) - hilum)
        tubes.append(Tube(hilum, end, (0.85 * r, 0.6 * r), 0.85 * wall_mm))
    if not tubes:
        return None
    wall, lumen = draw_tubes(cv.hu.shape, cv.spacing, tubes)
    room = _room(cv, sides)
    wall &= room
    lumen &= room
    if not wall.any():
        return None
    _commit_airways(cv, wall, lumen, p["hu"])
    lobes = lobes_hit(cv, wall)
    return wall, {"lobes": lobes, "side": side_of(lobes), "wall_mm": round(float(p["wall_mm"]))}


def draw_bronchiectasis(rng, sites):
    side = _side_draw(rng)
    sides = ("right", "left") if side == "both" else (side,)
    kind = str(rng.choice(["cylindrical", "varicose", "cystic"], p=[0.5, 0.25, 0.25]))
    return {
        "side": side,
        "kind": kind,
        # dilated: wider than the accompanying artery; exaggerated towards the upper end to read at 5-6 mm
        "lumen_mm": rng.uniform(10.0, 16.0),
        "wall_mm": rng.uniform(2.0, 3.0),
        "targets": {s: _peripheral_sites(rng, sites, LOWER[s], 4, (5.0, 15.0)) for s in sides},
        "cyst_mm": rng.uniform(14.0, 22.0, (4, 2)).tolist(),  # two cysts at the end of each bronchus
        "hu": rng.uniform(10.0, 40.0),
    }


def plant_bronchiectasis(cv: Canvas, p: dict, rng):
    sides = ("right", "left") if p["side"] == "both" else (p["side"],)
    wall_mm = max(p["wall_mm"], 0.8 * cv.spacing[:2].max())
    r = p["lumen_mm"] / 2
    tubes = []
    for s, (_, core) in _hilum_and_core(cv, sides).items():
        for k, site in enumerate(p["targets"][s]):
            # the dilated bronchi do not taper towards the periphery, the hallmark of bronchiectasis
            end = _to_out(cv, site)
            start = core + 0.25 * (end - core)
            if p["kind"] == "varicose":
                tubes.append(Tube(start, end, (r, r), wall_mm, bead=(0.3, 3.0 * r)))
            elif p["kind"] == "cystic":  # a narrower bronchus ending in a cluster of thin-walled cysts
                tubes.append(Tube(start, end, (0.6 * r, 0.6 * r), wall_mm))
                for j, c in enumerate(p["cyst_mm"][k]):  # one above the end, one below and further in
                    centre = end - (end - start) * (0.12 * j) - [0.0, 0.0, (j - 0.5) * c / cv.spacing[2]]
                    tubes.append(Tube(centre, centre, (c / 2, c / 2), wall_mm))
            else:
                tubes.append(Tube(start, end, (r, r), wall_mm))
    if not tubes:
        return None
    wall, lumen = draw_tubes(cv.hu.shape, cv.spacing, tubes)
    room = _room(cv, sides)
    wall &= room
    lumen &= room
    if not wall.any():
        return None
    _commit_airways(cv, wall, lumen, p["hu"])
    mask = wall | lumen
    lobes = lobes_hit(cv, mask)
    return mask, {"lobes": lobes, "kind": p["kind"], "lumen_mm": round(float(p["lumen_mm"]))}

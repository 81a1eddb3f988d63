"""Planters of the pleura and lungs: pleural effusion, atelectasis, consolidation, nodules, ground-glass
opacity and emphysema.

They run after the mediastinal planters (the order is in `ctclip.synthetic.planters`, with the
draw/plant contract): pleural fluid first, so the lung lesions avoid it, diffuse changes after focal ones.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctclip.synthetic.canvas import (
    LOBES,
    Canvas,
    bbox,
    box_around,
    dependent_band,
    ellipsoid_distance,
    lobe_at,
    pick_voxel,
    seeded_specks,
    smooth_field,
)

LOBE_WORDS = {
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
}
SIDE_LOBES = {"left": LOBES[:2], "right": LOBES[2:]}


def lobes_hit(cv: Canvas, mask: np.ndarray) -> list[str]:
    """Lobes holding at least a tenth of `mask`, in `LOBES` order, as report words."""
    lab = cv.labels[mask]
    counts = {lobe: int((lab == cv.ids[lobe]).sum()) for lobe in LOBES}
    total = max(sum(counts.values()), 1)
    return [LOBE_WORDS[lobe] for lobe in LOBES if counts[lobe] >= max(0.1 * total, 1)]


def side_of(lobe_words: list[str]) -> str:
    """The side ("bilateral", "right" or "left") that a list of lobe words covers."""
    right = any(w.startswith("right") for w in lobe_words)
    left = any(w.startswith("left") for w in lobe_words)
    return "bilateral" if right and left else "right" if right else "left"


def draw_pleural(rng, sites):
    side = str(rng.choice(["right", "left", "both"], p=[0.4, 0.3, 0.3]))
    return {
        "side": side,
        "depth_mm": {s: rng.uniform(12.0, 45.0) for s in ("left", "right")},
        "height_mm": rng.uniform(45.0, 110.0),
        "hu": rng.uniform(4.0, 18.0),
    }


def plant_pleural(cv: Canvas, p: dict, rng):
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


def draw_atelectasis(rng, sites):
    # atelectatic lung enhances after contrast: denser than pleural fluid
    return {
        "side": str(rng.choice(["right", "left"])),
        "depth_mm": rng.uniform(7.0, 14.0),
        "height_mm": rng.uniform(25.0, 60.0),
        "hu": rng.uniform(45.0, 80.0),
    }


def plant_atelectasis(cv: Canvas, p: dict, rng):
    lobe = SIDE_LOBES[p["side"]][-1 if p["side"] == "right" else 1]  # the lower lobe
    region = cv.organ(lobe) & ~cv.claimed  # above an effusion this is the compressed lung
    band = dependent_band(cv, region, max(p["depth_mm"], cv.spacing[1]), p["height_mm"])
    if not band.any():
        return None
    cv.commit(band, p["hu"])
    return band, {"lobe": LOBE_WORDS[lobe], "kind": "subsegmental"}


def draw_consolidation(rng, sites):
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


def plant_consolidation(cv: Canvas, p: dict, rng):
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


def draw_nodule(rng, sites):
    # solid nodules of 20-32 mm (log-uniform), 3-6 of them (the metastatic pattern): at 5.6 x 5.6 x 9.4 mm
    # voxels a nodule must span a few voxels to be seen (radiology calls those over 30 mm masses; the
    # report keeps "nodule"). With 2-5 of 15-30 mm the cut-across bronchi of bronchiectasis and
    # peribronchial thickening made as many blobs of the same size, and even a fixed-feature model read
    # the nodules at 0.74 (0.92 with these; docs/benchmarks.md, "What a nodule detector is up against").
    # They sit in the outer lung, where the vessels are thin: a nodule in the inner lung looks like the
    # enhanced hilar vessels around it at this grid
    n = int(rng.choice([3, 4, 5, 6], p=[0.25, 0.3, 0.25, 0.2]))
    nodules = []
    for _ in range(n):
        diameter = float(np.exp(rng.uniform(np.log(20.0), np.log(32.0))))
        lobe = str(rng.choice(LOBES, p=[0.25, 0.17, 0.28, 0.1, 0.2]))
        cand = sites[lobe]  # (N, 4): base voxel x, y, z and depth inside the lung in mm
        inside = cand[:, 3] >= diameter / 2 + 3.0
        outer = inside & (cand[:, 3] <= diameter / 2 + 20.0)
        deep = cand[outer] if outer.any() else cand[inside]
        if len(deep) == 0:
            deep = cand[np.argsort(cand[:, 3])[-20:]]
        site = deep[rng.integers(len(deep))]
        nodules.append(
            {
                "diameter_mm": diameter,
                "site": site[:3].tolist(),
                "aspect": rng.uniform(0.8, 1.0, 2).tolist(),
                "angle": rng.uniform(0, np.pi),
                "hu": rng.uniform(30.0, 60.0),
            }
        )
    return {"nodules": nodules}


def plant_nodule(cv: Canvas, p: dict, rng):
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


def draw_opacity(rng, sites):
    # multifocal ground glass, often in both lungs (the commonest opacity of CT-RATE's years, viral
    # pneumonia), in patches of 4-8 cm: smaller or fainter ones are a few voxels at 5.6 mm that the
    # partial volume of vessels and fissures hides. Denser than mosaic's brighter lobules (-740..-700),
    # fainter than consolidation
    lobes = rng.choice(LOBES, size=int(rng.integers(2, 5)), replace=False).tolist()
    return {"lobes": lobes, "radius_mm": rng.uniform(20.0, 40.0), "hu": rng.uniform(-600.0, -420.0)}


def plant_opacity(cv: Canvas, p: dict, rng):
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


def draw_emphysema(rng, sites):
    # confluent low attenuation, upper-zone predominant, with bullae: at 5.6 x 5.6 x 9.4 mm voxels single
    # centrilobular holes are one voxel at the density of the air outside the body and a model cannot tell
    # them from noise; the destroyed lung between them is what shows (mean lung density falls from about
    # -860 to -930 HU in moderate to severe emphysema)
    return {
        "fraction": rng.uniform(0.25, 0.55),  # share of the parenchyma destroyed, weighted to the upper zones
        "patch_mm": rng.uniform(12.0, 20.0),
        "low_hu": rng.uniform(-955.0, -925.0),
        "bulla_fraction": rng.uniform(0.04, 0.1),
        "radius_mm": (3.0, 6.0),
        "hu": rng.uniform(-990.0, -965.0),
    }


def plant_emphysema(cv: Canvas, p: dict, rng):
    lung = cv.lung() & ~cv.claimed
    box = bbox(lung)
    if box is None:
        return None
    paren = lung[box] & (cv.hu[box] < -700)  # vessels and lesions are spared
    if paren.sum() < 10:
        return None
    # upper-zone predominance: the share of destroyed lung grows from the bases to the apices
    z = np.nonzero(paren)[2]
    zz = np.arange(paren.shape[2], dtype=np.float32)
    upper = np.clip((zz - z.min()) / max(z.max() - z.min(), 1), 0.0, 1.0)
    field = smooth_field(paren.shape, cv.spacing, max(p["patch_mm"], 2.0 * cv.spacing[:2].max()), rng)
    field = field + 2.5 * (upper[None, None, :] - 0.5)
    low = paren & (field >= np.quantile(field[paren], 1.0 - p["fraction"]))
    if not low.any():
        return None
    # bullae: rounded air spaces inside the destroyed lung
    ball = max(4 / 3 * np.pi * np.mean(np.array(p["radius_mm"]) ** 3), np.prod(cv.spacing))
    n = int(np.clip(p["bulla_fraction"] * low.sum() * np.prod(cv.spacing) / ball, 1, 2000))
    holes = seeded_specks(low, cv.spacing, n, p["radius_mm"], rng)
    # the destroyed lung keeps a little of the parenchyma's texture
    values = np.where(holes, p["hu"], p["low_hu"] + 0.3 * (cv.hu[box] + 860.0)).astype(np.float32)
    cv.commit(low, values, box)
    mask = np.zeros(cv.hu.shape, dtype=bool)
    mask[box] = low
    severity = "moderate" if p["fraction"] < 0.4 else "severe"
    return mask, {"kind": "centrilobular", "zone": "upper lobe predominant", "severity": severity}

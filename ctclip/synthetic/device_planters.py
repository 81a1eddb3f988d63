"""The planter of "Medical material": a cardiac pacemaker or defibrillator with its leads, a central venous
catheter, a port catheter, or median sternotomy wires.

`draw_material(rng, sites)` runs once per patient, `plant_material(canvas, params, rng)` once per scan
(the contract is in `ctclip.synthetic.planters`), after the heart and vessels it is routed through.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctclip.synthetic.canvas import (
    Canvas,
    bbox,
    centreline,
    front_surface,
    polyline,
)
from ctclip.synthetic.cardiovascular_planters import HEART

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
        if not plane.any():  # a coarse grid can miss the sternum in a slice between its ends
            continue
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


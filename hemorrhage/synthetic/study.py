"""One synthetic head CT study in memory: the head posed in the scanner, bleeds planted, series sampled.

`synthesize_study(cfg, index)` returns study `index` of the dataset `cfg` describes, exactly as
`hemorrhage.synthetic.generate_head_dataset` writes it: same config and seed, same bytes. Every draw
comes from one random stream per study, in a fixed order.
"""

from __future__ import annotations

import math

import numpy as np

from hemorrhage.classes import SUBTYPES
from hemorrhage.synthetic.anatomy import BONE, CSF, SCALP, HeadAnatomy, load_head_anatomy
from hemorrhage.synthetic.config import HeadSynthConfig, min_thick_slices
from hemorrhage.synthetic.header import LOCALIZER_SLOT, MAX_INSTANCES, draw_study_header, make_uid
from hemorrhage.synthetic.planters import PLANTERS, Bleed, SlabBand
from hemorrhage.synthetic.scanner import F_RAS_LPS, lateral_localizer, rotation, sample_series, slice_geometry
from hemorrhage.synthetic.series import SeriesMeta, SyntheticLocalizer, SyntheticSeries, SyntheticStudy
from hemorrhage.synthetic.style import SCANNERS, draw_series_style, instance_numbers


def _draw_findings(rng: np.random.Generator, cfg: HeadSynthConfig) -> list[str]:
    if rng.random() < cfg.normal_share:
        return []
    probs = cfg.probabilities()
    chosen = [s for s in SUBTYPES if rng.random() < probs[s]]
    total = sum(probs.values())
    if not chosen and total > 0:  # a study that is not normal has at least one finding
        p = np.array([probs[s] for s in SUBTYPES]) / total
        chosen = [SUBTYPES[int(rng.choice(len(SUBTYPES), p=p))]]
    return chosen


def _slab_centre_z(anat: HeadAnatomy, coverage: float, rng: np.random.Generator) -> float:
    """Head-frame level of the middle of the covered slab: from the skull base up, around the ventricles."""
    bottom, top = anat.brain_z[0] + 22.0, anat.brain_z[1] + 6.0
    zv = float(np.median(anat.ventricle_pts[:, 2]))
    if coverage >= top - bottom:
        return (bottom + top) / 2.0 + rng.uniform(-4, 4)
    lo, hi = max(bottom + coverage / 2, zv - 12), min(top - coverage / 2, zv + 12)
    if lo > hi:
        return float(np.clip(zv, bottom + coverage / 2, top - coverage / 2))
    return rng.uniform(lo, hi)


def _jittered_head(anat: HeadAnatomy, rng: np.random.Generator) -> np.ndarray:
    """Per-study intensities: grey/white contrast, brain offset, bone density, scalp."""
    gain, offset = rng.uniform(0.9, 1.12), rng.uniform(-3.0, 3.0)
    scale = np.ones(5, np.float32)
    shift = np.zeros(5, np.float32)
    scale[BONE] = rng.uniform(0.9, 1.1)
    shift[SCALP] = rng.uniform(-5.0, 5.0)
    scale[CSF:] = gain
    shift[CSF:] = 30.0 * (1.0 - gain) + offset
    return anat.hu * scale[anat.tissue] + shift[anat.tissue]


def _union_by_subtype(bleeds: list[Bleed]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """subtype -> (box origin, box-local union mask) over that subtype's bleeds."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in SUBTYPES:
        bs = [b for b in bleeds if b.subtype == s]
        if not bs:
            continue
        lo = np.min([[sl.start for sl in b.box] for b in bs], axis=0)
        hi = np.max([[sl.stop for sl in b.box] for b in bs], axis=0)
        union = np.zeros(tuple(hi - lo), bool)
        for b in bs:
            union[tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(b.box, lo, strict=True))] |= b.mask
        out[s] = (lo, union)
    return out


def synthesize_study(cfg: HeadSynthConfig, index: int, anatomy: HeadAnatomy | None = None) -> SyntheticStudy:
    """Study `index` of the dataset `cfg` describes, in memory (deterministic in cfg.seed and index)."""
    anat = anatomy if anatomy is not None else load_head_anatomy()
    rng = np.random.default_rng([cfg.seed, index])
    header = draw_study_header(rng, cfg.seed, index, cfg.uid_style)
    rot = rotation(rng.uniform(-6, 6), rng.uniform(-12, 12), rng.uniform(-4, 4))
    trans = np.array([rng.uniform(-5, 5), rng.uniform(-25, 5), rng.uniform(-180, 20)])
    findings = _draw_findings(rng, cfg)

    n_thick = int(rng.integers(min_thick_slices(cfg), cfg.slices + 1))
    coverage = n_thick * cfg.slice_mm
    fov = rng.uniform(cfg.fov_min_mm, cfg.fov_max_mm)
    ps = fov / cfg.size
    tilt = rng.uniform(10, 25) * (1 if rng.random() < 0.8 else -1) if rng.random() < cfg.tilt_share else 0.0
    zc = _slab_centre_z(anat, coverage, rng)
    head_point = np.array([anat.centre[0], anat.centre[1], zc])
    slab_centre = rot @ (F_RAS_LPS @ (head_point - anat.centre)) + trans
    image_centre = slab_centre + np.array([rng.uniform(-12, 12), rng.uniform(-12, 12), 0.0])
    kinds = [("thick", cfg.slice_mm, n_thick)]
    if rng.random() < cfg.thin_share:
        thin = cfg.thin_mm if cfg.thin_mm < cfg.slice_mm else cfg.slice_mm / 2.0
        kinds.append(("thin", thin, max(3, int(round(coverage / thin)))))
    geoms = [slice_geometry(n, mm, mm, ps, cfg.size, tilt, image_centre) for _, mm, n in kinds]

    to_atlas = F_RAS_LPS @ rot.T
    slab = SlabBand(to_atlas @ (slab_centre - trans) + anat.centre, to_atlas @ geoms[0].normal, coverage / 2.0)
    gravity = to_atlas @ np.array([0.0, 1.0, 0.0])  # supine: patient posterior (+y in LPS) is down
    head = _jittered_head(anat, rng)
    bleeds = [b for s in findings if (b := PLANTERS[s](anat, rng, slab, gravity=gravity)) is not None]
    for b in bleeds:
        b.paint_rim(head)
    for b in bleeds:
        b.paint(head)
    masks = _union_by_subtype(bleeds)

    sigma = rng.uniform(2.5, 5.0)
    scanner = int(rng.integers(len(SCANNERS)))
    series: list[SyntheticSeries] = []
    for j, ((kind, mm, n), g) in enumerate(zip(kinds, geoms, strict=True)):
        style = draw_series_style(rng, scanner, j2k_share=cfg.j2k_share, rle_share=cfg.rle_share,
                                  multi_window_share=cfg.multi_window_share, quirk_share=cfg.quirk_share)
        hu, bits, labels = sample_series(head, masks, g, rot, trans, anat, rng, sigma * math.sqrt(5.0 / mm),
                                         cfg.min_label_mm2)
        series_uid = make_uid(cfg.uid_style, cfg.seed, "series", index, j)
        sops = tuple(make_uid(cfg.uid_style, cfg.seed, "sop", index, j, k) for k in range(n))
        desc = (f"Head {mm:g}mm" if kind == "thick" else f"Head {mm:g}mm thin") + ("" if tilt == 0 else " tilt")
        meta = SeriesMeta(series_uid, 2 + j, desc, g, style, sops, instance_numbers(style.instance_order, n, rng))
        series.append(SyntheticSeries(meta, kind, hu, bits, labels))

    localizer = None
    if rng.random() < cfg.localizer_share:
        image, lps, position = lateral_localizer(head, anat, rot, trans, cfg.size)
        shared = bool(rng.random() < 0.5)
        own = make_uid(cfg.uid_style, cfg.seed, "series", index, LOCALIZER_SLOT)
        sop = make_uid(cfg.uid_style, cfg.seed, "sop", index, LOCALIZER_SLOT, MAX_INSTANCES)
        localizer = SyntheticLocalizer(image, lps, position, sop, series[0].meta.series_uid if shared else own,
                                       2 if shared else 1, shared)
    planted = tuple(s for s in SUBTYPES if any(b.subtype == s for b in bleeds))
    pose = {"tilt_deg": round(tilt, 2), "fov_mm": round(fov, 2), "noise_hu": round(sigma, 2),
            "rotation": np.round(rot, 5).tolist(), "translation_mm": np.round(trans, 2).tolist()}
    return SyntheticStudy(index, header, planted, [b.summary() for b in bleeds], series, localizer, pose)

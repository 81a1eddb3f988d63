"""Synthetic head CT studies in the RSNA 2019 format, with planted hemorrhages of the five subtypes.

    python scripts/hemorrhage_make_synthetic.py --out_dir data/synth_head --n_studies 20 --size 512 \\
        --slices 32 --seed 0 --broken 2 --montage data/synth_head/montage.png

Each study is the real CT brain atlas in a synthetic skull and scalp (`synthetic_anatomy`), posed a
little differently in the scanner, with none, one or several acute bleeds, sampled as axial slices
(a thick series, sometimes also a thin one) and written as DICOM files (`synthetic_dicom`). Output:

    DIR/dicom/...                  one file per slice, shuffled names, several folder layouts
    DIR/labels.csv                 Kaggle stage_2_train.csv format: ID,Label; ID = <SOPInstanceUID>_<class>
    DIR/studies.csv                one row per axial series: uids, n_slices, 0/1 per class
    DIR/broken.csv                 path,kind of the deliberately broken files (not in labels.csv)
    DIR/truth/<SeriesUID>.npz      per-slice masks (bit per subtype), labels, SOP UIDs and paths in true
                                   position order; see `read_truth`
    DIR/truth/files.csv, bleeds.csv  every file written; every bleed planted
    DIR/config.yaml                the resolved configuration

`synthesize_study(cfg, index)` returns one study in memory (HU volumes, masks, geometry) exactly as
`generate_head_dataset` writes it: same config and seed, same bytes.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from hemorrhage.classes import CLASSES, KAGGLE_ROW_ORDER, SUBTYPES
from hemorrhage.synthetic_anatomy import (
    BONE,
    CSF,
    PLANTERS,
    SCALP,
    Bleed,
    HeadAnatomy,
    SlabBand,
    load_head_anatomy,
)
from hemorrhage.synthetic_dicom import (
    HU_MAX,
    HU_MIN,
    LOCALIZER_SLOT,
    MAX_INSTANCES,
    SCANNERS,
    SUBTYPE_BIT,
    UID_STYLES,
    FileRecord,
    SeriesMeta,
    SliceGeometry,
    SyntheticLocalizer,
    SyntheticSeries,
    SyntheticStudy,
    draw_series_style,
    draw_study_header,
    instance_numbers,
    make_uid,
    write_atomic,
    write_study_files,
)

log = logging.getLogger(__name__)

F_RAS_LPS = np.diag([-1.0, -1.0, 1.0])  # atlas index axes (RAS, 1 mm) -> patient axes (LPS)
MIN_BLOOD_FRACTION = 0.6  # a voxel belongs to a finding when at least this much of it is blood
PURE_BLOOD_MAX_HU = 100.0  # above this (before noise) a voxel is partial-volumed with bone
OUTPUTS = ("dicom", "truth", "labels.csv", "studies.csv", "broken.csv", "config.yaml")


@dataclass
class HeadSynthConfig:
    """What `generate_head_dataset` makes. Shares are per series unless said otherwise."""

    out_dir: Path = Path("synthetic_head")
    n_studies: int = 8
    size: int = 256  # rows = columns of the axial images
    slices: int = 32  # slices of the thick series (at most; see slices_jitter)
    seed: int = 0
    broken: int = 0  # files written broken (truncated / without pixel data), left out of labels.csv
    overwrite: bool = False
    slice_mm: float = 5.0  # spacing = thickness of the thick series
    thin_mm: float = 2.5  # spacing = thickness of the thin series
    thin_share: float = 0.25  # studies that also get a thin reconstruction (a second series)
    slices_jitter: float = 0.2  # a study has between slices * (1 - jitter) and slices thick slices
    fov_min_mm: float = 220.0  # reconstruction diameter (in-plane field of view) drawn per study
    fov_max_mm: float = 250.0
    normal_share: float = 0.3  # studies without any hemorrhage
    p_epidural: float = 0.25  # probability of each subtype in a study that is not normal
    p_intraparenchymal: float = 0.25
    p_intraventricular: float = 0.25
    p_subarachnoid: float = 0.25
    p_subdural: float = 0.25
    j2k_share: float = 0.15  # series stored as JPEG 2000 lossless
    rle_share: float = 0.15  # series stored as RLE lossless
    multi_window_share: float = 0.3  # series with multi-valued WindowCenter/WindowWidth
    quirk_share: float = 0.1  # series with the BitsStored-12 / intercept 0 quirk
    localizer_share: float = 0.3  # studies with a lateral localizer image (0 = none)
    tilt_share: float = 0.15  # series with gantry tilt (oblique ImageOrientationPatient)
    uid_style: str = "dicom"  # "dicom": proper UIDs; "rsna": ID_ + hex, like the Kaggle data
    min_label_mm2: float = 10.0  # a subtype counts on a slice from this much planted area on it

    def probabilities(self) -> dict[str, float]:
        return {s: float(getattr(self, f"p_{s}")) for s in SUBTYPES}


# ----------------------------------------------------------------------------------------- validation


def validate_config(cfg: HeadSynthConfig) -> None:
    """Raise ValueError naming the first nonsensical setting."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"HeadSynthConfig: {msg}")

    need(isinstance(cfg.n_studies, int) and cfg.n_studies >= 1, f"n_studies must be >= 1, got {cfg.n_studies}")
    need(isinstance(cfg.size, int) and 32 <= cfg.size <= 2048, f"size must be 32..2048 pixels, got {cfg.size}")
    need(isinstance(cfg.slices, int) and 3 <= cfg.slices <= 1024, f"slices must be 3..1024, got {cfg.slices}")
    need(isinstance(cfg.seed, int) and cfg.seed >= 0, f"seed must be a non-negative integer, got {cfg.seed}")
    need(0.3 <= cfg.slice_mm <= 20, f"slice_mm must be 0.3..20 mm, got {cfg.slice_mm}")
    need(0.3 <= cfg.thin_mm <= 20, f"thin_mm must be 0.3..20 mm, got {cfg.thin_mm}")
    need(100 <= cfg.fov_min_mm <= cfg.fov_max_mm <= 500,
         f"need 100 <= fov_min_mm <= fov_max_mm <= 500, got {cfg.fov_min_mm}, {cfg.fov_max_mm}")
    need(0.0 <= cfg.slices_jitter < 1.0, f"slices_jitter must be in [0, 1), got {cfg.slices_jitter}")
    need(cfg.min_label_mm2 >= 0, f"min_label_mm2 must be >= 0, got {cfg.min_label_mm2}")
    need(cfg.uid_style in UID_STYLES, f"uid_style must be one of {UID_STYLES}, got {cfg.uid_style!r}")
    shares = ["thin_share", "normal_share", "j2k_share", "rle_share", "multi_window_share", "quirk_share",
              "localizer_share", "tilt_share"] + [f"p_{s}" for s in SUBTYPES]
    for name in shares:
        v = getattr(cfg, name)
        need(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, f"{name} must be a probability in [0, 1], got {v}")
    need(cfg.j2k_share + cfg.rle_share <= 1.0, "j2k_share + rle_share must be <= 1")
    if cfg.uid_style == "rsna":
        thin = cfg.thin_mm if cfg.thin_mm < cfg.slice_mm else cfg.slice_mm / 2.0
        most = cfg.slices * max(1.0, cfg.slice_mm / thin if cfg.thin_share > 0 else 1.0)
        need(most <= MAX_INSTANCES and cfg.n_studies < 1 << 24,
             f"uid_style rsna numbers at most {MAX_INSTANCES} slices per series and 2**24 studies")
    need(isinstance(cfg.broken, int) and cfg.broken >= 0, f"broken must be >= 0, got {cfg.broken}")
    per_study = max(0, min_thick_slices(cfg) - 2)
    need(cfg.broken <= cfg.n_studies * per_study,
         f"broken={cfg.broken} is more than the {cfg.n_studies * per_study} slices that can be broken "
         f"({per_study} inner slices of each of {cfg.n_studies} thick series)")


def min_thick_slices(cfg: HeadSynthConfig) -> int:
    return max(3, math.ceil(cfg.slices * (1.0 - cfg.slices_jitter)))


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out_dir {out_dir} is not empty; pass --overwrite to replace a synthetic dataset")
        for name in OUTPUTS:  # only what this generator writes: other files are left alone
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------- one study


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation (degrees) about z (in-plane), x (nodding) and y (tilting to one shoulder)."""
    a, b, c = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


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


def _geometry(n: int, spacing: float, thickness: float, ps: float, size: int, tilt_deg: float,
              centre: np.ndarray) -> SliceGeometry:
    t = np.radians(tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row, col)
    k = np.arange(n) - (n - 1) / 2.0
    pos = centre[None, :] + k[:, None] * spacing * normal - (size - 1) / 2.0 * ps * (row + col)
    orient = tuple(float(round(v, 6)) for v in (*row, *col))
    return SliceGeometry(orient, np.round(pos, 4), ps, thickness, spacing, size, size)


def _index_affine(g: SliceGeometry, rot: np.ndarray, trans: np.ndarray, centre: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(M, off): atlas index = M @ (slice, row, column) + off."""
    o = np.asarray(g.orientation)
    to_atlas = F_RAS_LPS @ rot.T
    m = to_atlas @ np.stack([g.spacing * g.normal, g.pixel_spacing * o[3:], g.pixel_spacing * o[:3]], axis=1)
    off = to_atlas @ (g.positions[0] - trans) + centre
    return m, off


def _blur_size(thickness: float) -> int:
    """Slab averaging window in 1 mm atlas voxels, odd so that it stays centred on the slice."""
    return max(1, 2 * int(round((thickness - 1.0) / 2.0)) + 1)


def _resample_hu(vol: np.ndarray, m: np.ndarray, off: np.ndarray, shape: tuple[int, int, int],
                 blur: int) -> np.ndarray:
    """Trilinear samples of the (slab-averaged) atlas-space volume on the output grid."""
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in shape])), float) @ m.T + off
    lo = np.maximum(np.floor(corners.min(0)).astype(int) - 2 - np.array([0, 0, blur]), 0)
    hi = np.minimum(np.ceil(corners.max(0)).astype(int) + 3 + np.array([0, 0, blur]), vol.shape)
    if np.any(hi <= lo):
        return np.full(shape, -1000.0, np.float32)
    sub = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    if blur > 1:
        sub = ndi.uniform_filter1d(sub, blur, axis=2, mode="nearest")
    return ndi.affine_transform(sub, m, off - lo, output_shape=shape, order=1, mode="constant",
                                cval=-1000.0, prefilter=False)


def _resample_mask(mask: np.ndarray, box_lo: np.ndarray, m: np.ndarray, off: np.ndarray,
                   shape: tuple[int, int, int], blur: int) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Where a box-local mask lands on the output grid: (output box, voxels mostly covered by it)."""
    pad = blur // 2 + 1
    arr = np.pad(mask.astype(np.float32), ((1, 1), (1, 1), (pad, pad)))
    lo = box_lo - np.array([1, 1, pad])
    if blur > 1:
        arr = ndi.uniform_filter1d(arr, blur, axis=2, mode="constant")
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in arr.shape])), float) + lo
    out = (corners - off) @ np.linalg.inv(m).T
    olo = np.clip(np.floor(out.min(0)).astype(int) - 1, 0, shape)
    ohi = np.clip(np.ceil(out.max(0)).astype(int) + 2, 0, shape)
    if np.any(ohi <= olo):
        return None
    frac = ndi.affine_transform(arr, m, off + m @ olo - lo, output_shape=tuple(ohi - olo), order=1,
                                mode="constant", cval=0.0, prefilter=False)
    return tuple(slice(int(a), int(b)) for a, b in zip(olo, ohi, strict=True)), frac >= MIN_BLOOD_FRACTION


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_hu: float,
                      pixel_spacing: float) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    corr = 0.35 / pixel_spacing  # CT noise grain of about 0.35 mm, in pixels
    if corr >= 0.4:
        noise = ndi.gaussian_filter(noise, (0, corr, corr))
        noise /= noise.std() + 1e-6
    return noise * sigma_hu


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


def _sample_series(head: np.ndarray, masks: dict[str, tuple[np.ndarray, np.ndarray]], g: SliceGeometry,
                   rot: np.ndarray, trans: np.ndarray, anat: HeadAnatomy, rng: np.random.Generator,
                   sigma_hu: float, min_label_mm2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(g.positions)
    shape = (n, g.rows, g.columns)
    m, off = _index_affine(g, rot, trans, anat.centre)
    blur = _blur_size(g.thickness)
    clean = _resample_hu(head, m, off, shape, blur)
    hu = np.clip(np.rint(clean + _correlated_noise(rng, shape, sigma_hu, g.pixel_spacing)), HU_MIN, HU_MAX)
    hu = hu.astype(np.int16)
    bits = np.zeros(shape, np.uint8)
    labels = np.zeros((n, len(CLASSES)), np.uint8)
    min_px = max(1, math.ceil(min_label_mm2 / g.pixel_spacing**2))
    for s, (lo, union) in masks.items():
        res = _resample_mask(union, lo, m, off, shape, blur)
        if res is None:
            continue
        box, on = res
        on &= clean[box] < PURE_BLOOD_MAX_HU  # blood blurred with the skull reads as bone, not blood
        counts = on.sum(axis=(1, 2))
        on[counts < min_px] = False  # too little on a slice to call: neither mask nor label
        bits[box][on] |= SUBTYPE_BIT[s]
        labels[box[0], CLASSES.index(s)] = counts >= min_px
    labels[:, 0] = labels[:, 1:].max(axis=1)
    return hu, bits, labels


def _localizer(head: np.ndarray, anat: HeadAnatomy, rot: np.ndarray, trans: np.ndarray, size: int
               ) -> tuple[np.ndarray, float, np.ndarray]:
    """A lateral projection radiograph of the head, as HU-like values (bone bright)."""
    mu = np.clip(head + 1000.0, 0.0, None).sum(axis=0) * (0.02 / 1000.0)  # line integral along x
    ps = 280.0 / size
    half = (size - 1) / 2.0 * ps
    cy, cz = anat.centre[1], anat.centre[2]
    m = np.array([[0.0, -ps], [-ps, 0.0]])
    img = ndi.affine_transform(mu, m, (cy + half, cz + half), output_shape=(size, size), order=1, cval=0.0)
    image = np.clip(-1000.0 + 900.0 * img, HU_MIN, HU_MAX).astype(np.int16)
    corner = np.array([anat.centre[0], cy + half, cz + half])
    position = rot @ (F_RAS_LPS @ (corner - anat.centre)) + trans
    return image, ps, np.round(position, 4)


def synthesize_study(cfg: HeadSynthConfig, index: int, anatomy: HeadAnatomy | None = None) -> SyntheticStudy:
    """Study `index` of the dataset `cfg` describes, in memory (deterministic in cfg.seed and index)."""
    anat = anatomy if anatomy is not None else load_head_anatomy()
    rng = np.random.default_rng([cfg.seed, index])
    header = draw_study_header(rng, cfg.seed, index, cfg.uid_style)
    rot = _rotation(rng.uniform(-6, 6), rng.uniform(-12, 12), rng.uniform(-4, 4))
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
    geoms = [_geometry(n, mm, mm, ps, cfg.size, tilt, image_centre) for _, mm, n in kinds]

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
        hu, bits, labels = _sample_series(head, masks, g, rot, trans, anat, rng, sigma * math.sqrt(5.0 / mm),
                                          cfg.min_label_mm2)
        series_uid = make_uid(cfg.uid_style, cfg.seed, "series", index, j)
        sops = tuple(make_uid(cfg.uid_style, cfg.seed, "sop", index, j, k) for k in range(n))
        desc = (f"Head {mm:g}mm" if kind == "thick" else f"Head {mm:g}mm thin") + ("" if tilt == 0 else " tilt")
        meta = SeriesMeta(series_uid, 2 + j, desc, g, style, sops, instance_numbers(style.instance_order, n, rng))
        series.append(SyntheticSeries(meta, kind, hu, bits, labels))

    localizer = None
    if rng.random() < cfg.localizer_share:
        image, lps, position = _localizer(head, anat, rot, trans, cfg.size)
        shared = bool(rng.random() < 0.5)
        own = make_uid(cfg.uid_style, cfg.seed, "series", index, LOCALIZER_SLOT)
        sop = make_uid(cfg.uid_style, cfg.seed, "sop", index, LOCALIZER_SLOT, MAX_INSTANCES)
        localizer = SyntheticLocalizer(image, lps, position, sop, series[0].meta.series_uid if shared else own,
                                       2 if shared else 1, shared)
    planted = tuple(s for s in SUBTYPES if any(b.subtype == s for b in bleeds))
    pose = {"tilt_deg": round(tilt, 2), "fov_mm": round(fov, 2), "noise_hu": round(sigma, 2),
            "rotation": np.round(rot, 5).tolist(), "translation_mm": np.round(trans, 2).tolist()}
    return SyntheticStudy(index, header, planted, [b.summary() for b in bleeds], series, localizer, pose)


# ----------------------------------------------------------------------------------------- dataset


@dataclass
class HeadDatasetSummary:
    out_dir: Path
    n_studies: int
    n_series: int
    n_slices: int  # labelled slices (broken files and localizers excluded)
    n_files: int
    n_broken: int
    n_localizers: int
    positive_slices: dict[str, int]
    positive_series: dict[str, int]
    seconds: float

    def line(self) -> str:
        pos = ", ".join(f"{c} {self.positive_slices[c]}/{self.positive_series[c]}" for c in CLASSES)
        return (f"synthetic head CT: {self.n_studies} studies, {self.n_series} series, {self.n_slices} labelled "
                f"slices; positive slices/series: {pos}; {self.n_broken} broken files, {self.n_localizers} "
                f"localizers; {self.seconds:.1f} s -> {self.out_dir}")


def plan_broken(cfg: HeadSynthConfig) -> dict[int, list[str]]:
    """Which studies get how many broken files, of which kind (alternating), spread evenly."""
    plan: dict[int, list[str]] = {}
    if cfg.broken == 0:
        return plan
    order = np.random.default_rng([cfg.seed, 0xB40CE4]).permutation(cfg.n_studies)
    for k in range(cfg.broken):
        plan.setdefault(int(order[k % cfg.n_studies]), []).append("truncated" if k % 2 == 0 else "no_pixel_data")
    return plan


def _csv_bytes(header: list[str], rows: list[list[object]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps, so equal arrays give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    tmp.replace(path)


def truth_arrays(study: SyntheticStudy, s: SyntheticSeries, records: list[FileRecord]) -> dict[str, np.ndarray]:
    g, st = s.meta.geometry, s.meta.style
    return {
        "masks": s.masks, "labels": s.labels, "classes": np.array(CLASSES),
        "subtypes": np.array(SUBTYPES), "subtype_bits": np.array([SUBTYPE_BIT[x] for x in SUBTYPES], np.uint8),
        "sop_uids": np.array(s.meta.sop_uids), "paths": np.array([r.path for r in records]),
        "broken": np.array([r.broken for r in records]), "positions": g.positions,
        "position_along_normal": g.positions @ g.normal, "orientation": np.array(g.orientation),
        "instance_numbers": np.array(s.meta.instance_numbers, np.int32),
        "study_index": np.array(study.index), "findings": np.array(study.findings, dtype="<U32"),
        "study_uid": np.array(study.header.study_uid), "series_uid": np.array(s.meta.series_uid),
        "kind": np.array(s.kind), "pixel_format": np.array(st.pixel_format),
        "transfer_syntax": np.array(st.transfer_syntax), "quirk": np.array(st.quirk),
        "pixel_spacing": np.array(g.pixel_spacing), "thickness": np.array(g.thickness),
        "bleeds": np.array(json.dumps(study.bleeds, sort_keys=True)),
    }


def read_truth(path: str | Path) -> dict[str, object]:
    """A truth file as a dict (scalars unpacked; ``bleeds`` parsed from JSON)."""
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, object] = {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    out["bleeds"] = json.loads(str(out["bleeds"]))
    return out


def generate_head_dataset(cfg: HeadSynthConfig) -> HeadDatasetSummary:
    """Write the dataset `cfg` describes (see the module docstring for the files)."""
    from tqdm.auto import tqdm

    from ctcore.cli import save_resolved

    t0 = time.perf_counter()
    validate_config(cfg)
    out = Path(cfg.out_dir)
    prepare_out_dir(out, cfg.overwrite)
    anat = load_head_anatomy()
    plan = plan_broken(cfg)
    used: set[str] = set()
    labels, series_rows, file_rows, bleed_rows = [], [], [], []
    pos_slices = dict.fromkeys(CLASSES, 0)
    pos_series = dict.fromkeys(CLASSES, 0)
    n_files = n_broken = n_loc = 0
    for i in tqdm(range(cfg.n_studies), desc="synthetic head studies", unit="study", disable=None):
        study = synthesize_study(cfg, i, anat)
        records = write_study_files(study, out, cfg.seed, plan.get(i, []), used)
        axial = {r.sop_uid: r for r in records if r.kind == "axial"}
        for s in study.series:
            recs = [axial[u] for u in s.meta.sop_uids]
            save_npz(out / "truth" / f"{s.meta.series_uid}.npz", truth_arrays(study, s, recs))
            ok = np.array([r.broken == "" for r in recs])
            for k in np.flatnonzero(ok):
                row = dict(zip(CLASSES, s.labels[k].tolist(), strict=True))
                labels += [[f"{recs[k].sop_uid}_{c}", row[c]] for c in KAGGLE_ROW_ORDER]
            flags = s.labels[ok].max(axis=0) if ok.any() else np.zeros(len(CLASSES), np.uint8)
            series_rows.append([study.header.study_uid, s.meta.series_uid, int(ok.sum()), *flags.tolist()])
            for c, n_pos, f in zip(CLASSES, s.labels[ok].sum(axis=0), flags, strict=True):
                pos_slices[c] += int(n_pos)
                pos_series[c] += int(f)
        for b in study.bleeds:
            rest = {k: v for k, v in b.items() if k not in ("subtype", "pattern", "density_hu", "volume_ml")}
            bleed_rows.append([study.header.study_uid, b["subtype"], b["pattern"], b["density_hu"], b["volume_ml"],
                               json.dumps(rest, sort_keys=True)])
        for r in records:
            file_rows.append([r.path, r.kind, r.broken, r.study_uid, r.series_uid, r.sop_uid, r.slice_index])
        n_files += len(records)
        n_broken += sum(r.broken != "" for r in records)
        n_loc += sum(r.kind == "localizer" for r in records)
    write_atomic(out / "labels.csv", _csv_bytes(["ID", "Label"], labels))
    write_atomic(out / "studies.csv", _csv_bytes(["StudyInstanceUID", "SeriesInstanceUID", "n_slices", *CLASSES],
                                                 series_rows))
    write_atomic(out / "broken.csv", _csv_bytes(["path", "kind"], [[r[0], r[2]] for r in file_rows if r[2]]))
    write_atomic(out / "truth" / "files.csv", _csv_bytes(
        ["path", "kind", "broken", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "slice_index"], file_rows))
    write_atomic(out / "truth" / "bleeds.csv", _csv_bytes(
        ["StudyInstanceUID", "subtype", "pattern", "density_hu", "volume_ml", "details"], bleed_rows))
    save_resolved(cfg, out / "config.yaml")
    return HeadDatasetSummary(out, cfg.n_studies, len(series_rows), len(labels) // len(CLASSES), n_files, n_broken,
                              n_loc, pos_slices, pos_series, time.perf_counter() - t0)

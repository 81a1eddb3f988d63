"""Synthetic chest CT in the CT-RATE layout, built on a real contrast chest CT and its organ labels.

    python scripts/ctclip_make_synthetic.py --out_dir data/ct_rate --n_patients 20 --size 512 512 \\
        --slices 128 --seed 0 --variant hu
    python scripts/ctclip_make_synthetic.py --config configs/ctclip/synthetic_small.yaml --out_dir /tmp/ct

Each patient gets 1-2 scans (a, b) and each scan 1-3 reconstructions (1, 2, 3). A scan is the real
sample volume under a small random rotation, scale, shift and z-crop, resampled to the requested grid
(the honest voxel size follows from the field of view), with findings planted by
`ctclip.data.synthetic_findings`. Reconstructions of a scan share anatomy and findings and differ in
kernel, noise and slice profile. Outputs follow `data/ct_rate` of the original project:

    DIR/volumes/{train,valid}/<split>_<pid>/<split>_<pid>_<scan>/<split>_<pid>_<scan>_<recon>.nii.gz
    DIR/{train,validation}_metadata.csv  DIR/{train,validation}_reports.csv
    DIR/{train,valid}_predicted_labels.csv
    DIR/masks/<VolumeName>      uint32, bit k set where FINDINGS[k] was planted (same grid and affine)
    DIR/synthetic_info.json     config, storage variant, per-volume planted findings, timing

Storage variants (the CT-RATE pitfall, DESIGN.md 4.1): the metadata always lists RescaleSlope 1 and
RescaleIntercept -1024 or -8192. `raw` stores HU - intercept (apply the CSV to get HU); `hu` stores
HU already, as the current CT-RATE release does. The NIfTI's own scaling is left unset in both.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ctclip.data.synthetic_findings import LOBES, PLANTABLE, PLANTERS, Canvas, remove_real_findings
from ctclip.data.synthetic_reports import (
    METADATA_COLUMNS,
    REPORT_COLUMNS,
    compose_report,
    draw_scanner,
    metadata_row,
)
from ctclip.findings import FINDINGS, LABEL_COLUMNS, finding_index

log = logging.getLogger(__name__)

VARIANTS = ("raw", "hu")
ORIENTATIONS = ("LPS", "RAS", "LAS", "LAI")
SPLITS = {
    "train": ("train_metadata.csv", "train_reports.csv", "train_predicted_labels.csv"),
    "valid": ("validation_metadata.csv", "validation_reports.csv", "valid_predicted_labels.csv"),
}
INFO_FILE = "synthetic_info.json"
OUTSIDE_FOV_HU = -2048.0  # value outside the reconstruction circle, as in the real sample


@dataclass
class ChestSynthConfig:
    out_dir: Path = Path("synthetic_ct_rate")
    n_patients: int = 8
    size: tuple[int, int] = (64, 64)  # (H, W) = (Rows, Columns)
    slices: int = 24
    seed: int = 0
    variant: str = "raw"
    valid_fraction: float = 0.3
    scans_per_patient: tuple[int, int] = (1, 2)
    recons_per_scan: tuple[int, int] = (1, 3)
    prevalence: dict[str, float] = field(default_factory=dict)  # per finding; others: default_prevalence
    default_prevalence: float = 0.3
    empty_impression_rate: float = 0.2  # half NaN, half "Not given."
    intercept_8192_rate: float = 0.28  # share of scans listed with RescaleIntercept -8192
    noise_hu: tuple[float, float] = (8.0, 20.0)  # Gaussian noise sigma range, before the kernel
    rotation_deg: float = 4.0
    scale_jitter: float = 0.06
    shift_mm: float = 10.0
    intensity_jitter_hu: float = 8.0
    scan_keep_rate: float = 0.85  # share of a patient's findings still present in a later scan
    orientations: tuple[str, ...] = ORIENTATIONS
    overwrite: bool = False
    samples_dir: Path | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.size = tuple(self.size)  # type: ignore[assignment]
        self.scans_per_patient = tuple(self.scans_per_patient)  # type: ignore[assignment]
        self.recons_per_scan = tuple(self.recons_per_scan)  # type: ignore[assignment]
        self.noise_hu = tuple(self.noise_hu)  # type: ignore[assignment]
        self.orientations = tuple(self.orientations)
        self.prevalence = parse_prevalence(self.prevalence)

    def validate(self) -> None:
        if len(self.size) != 2 or any(int(s) != s or not 16 <= s <= 2048 for s in self.size):
            raise ValueError(f"size must be two integers H W in 16..2048, got {self.size}")
        if int(self.slices) != self.slices or not 8 <= self.slices <= 1024:
            raise ValueError(f"slices must be an integer in 8..1024, got {self.slices}")
        if self.n_patients < 1:
            raise ValueError(f"n_patients must be at least 1, got {self.n_patients}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name, (lo, hi), top in (
            ("scans_per_patient", self.scans_per_patient, 26),
            ("recons_per_scan", self.recons_per_scan, 9),
        ):
            if not 1 <= lo <= hi <= top:
                raise ValueError(f"{name} must be MIN MAX with 1 <= MIN <= MAX <= {top}, got {lo} {hi}")
        for name in (
            "valid_fraction",
            "default_prevalence",
            "empty_impression_rate",
            "intercept_8192_rate",
            "scan_keep_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.noise_hu[0] <= self.noise_hu[1]:
            raise ValueError(f"noise_hu must be MIN MAX with 0 <= MIN <= MAX, got {self.noise_hu}")
        bad = [o for o in self.orientations if o not in ORIENTATIONS]
        if bad or not self.orientations:
            raise ValueError(
                f"orientations must be a non-empty subset of {ORIENTATIONS}, got {self.orientations}"
            )

    def prevalence_of(self, name: str) -> float:
        return self.prevalence.get(name, self.default_prevalence)


def parse_prevalence(value: dict | list | tuple | str | None) -> dict[str, float]:
    """`{"Lung nodule": 0.5}` or `["Lung nodule=0.5", ...]` -> checked dict (errors name the problem)."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            name, sep, p = str(item).rpartition("=")
            if not sep:
                raise ValueError(f"prevalence {item!r}: expected NAME=P, e.g. 'Lung nodule=0.4'")
            try:
                pairs[name.strip()] = float(p)
            except ValueError:
                raise ValueError(f"prevalence {item!r}: {p!r} is not a number") from None
        value = pairs
    unknown = [n for n in value if n not in FINDINGS]
    if unknown:
        raise ValueError(
            f"prevalence: unknown finding(s) {unknown}; the CT-RATE findings are: {', '.join(FINDINGS)}"
        )
    out = {}
    for name, p in value.items():
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"prevalence of {name!r} must be in [0, 1], got {p}")
        if p > 0 and name not in PLANTABLE:
            raise ValueError(
                f"prevalence: {name!r} cannot be planted (its label is always 0); "
                f"plantable: {', '.join(PLANTABLE)}"
            )
        out[name] = p
    return out


# ---- the real base volume ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChestBase:
    """The real chest CT, RAS, as float32 HU (x, y, z) and its labels; shared read-only by all volumes."""

    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray  # voxel -> world (RAS mm), diagonal
    ids: dict[str, int]
    centre_mm: np.ndarray  # mediastinum centre in x, y; lung centre in z
    crop_mm: tuple[float, float, float, float]  # allowed z-crop: bottom in [a, b], top in [c, d]
    sites: dict[str, np.ndarray]  # lobe -> (N, 4) base voxel x, y, z and depth inside the lung (mm)
    source: str


def _read_structures(path: Path) -> dict[str, int]:
    table = pd.read_csv(path)
    return {str(s): int(i) for s, i in zip(table["structure"], table["id"], strict=True)}


@functools.lru_cache(maxsize=1)
def _real_chest(samples_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int], str]:
    """The sample chest CT and labels, RAS, (z, y, x) in memory, with the patient's own findings erased."""
    from ctcore.samples import fetch_samples

    s = fetch_samples(samples_dir, keys=["chest_ct", "chest_mask", "chest_structures"])
    ct = nib.as_closest_canonical(nib.load(s.chest_ct))
    mask = nib.as_closest_canonical(nib.load(s.chest_mask))
    if not np.allclose(ct.affine, mask.affine, atol=1e-3):
        raise ValueError("chest_ct and chest_mask grids differ")
    if np.abs(ct.affine[:3, :3] - np.diag(np.diag(ct.affine[:3, :3]))).max() > 1e-6:
        raise ValueError("the sample chest CT is oblique; this generator expects an axis-aligned grid")
    hu = np.ascontiguousarray(np.asarray(ct.dataobj, dtype=np.float32).T)
    labels = np.ascontiguousarray(np.asarray(mask.dataobj).astype(np.uint8).T)
    ids = _read_structures(s.chest_structures)
    erased = remove_real_findings(hu.T, labels.T, np.abs(np.diag(ct.affine)[:3]), ids)
    log.info("base volume: erased the sample patient's own findings (voxels): %s", erased)
    _close_lung_labels(hu, labels, [ids[n] for n in LOBES])
    for a in (hu, labels):
        a.flags.writeable = False
    return hu, labels, ct.affine, ids, str(s.chest_ct)


@functools.lru_cache(maxsize=4)
def load_chest_base(size: tuple[int, int], slices: int, samples_dir: Path | None = None) -> ChestBase:
    """Load the sample chest CT once, reorient to RAS, and low-pass it for the target grid (no aliasing)."""
    hu, labels, affine, ids, source = _real_chest(samples_dir)
    spacing = np.abs(np.diag(affine)[:3])
    nominal = np.array([360.0 / max(size), 360.0 / max(size), 300.0 / slices])
    sigma = 0.4 * np.sqrt(np.maximum((nominal / spacing) ** 2 - 1.0, 0.0))
    if sigma.max() > 0.1:
        hu = ndi.gaussian_filter(hu, sigma[::-1], truncate=3.0)
        hu.flags.writeable = False
    lung_ids = [ids[n] for n in LOBES]
    hu_x, lab_x = hu.T, labels.T  # (x, y, z) views
    lung = np.isin(lab_x, lung_ids)
    chest = lung | (lab_x == ids["heart"])
    xy = nib.affines.apply_affine(affine, np.argwhere(chest[::4, ::4, ::2]) * [4, 4, 2]).mean(axis=0)
    lz = np.flatnonzero(lung.any(axis=(0, 1)))
    z_world = affine[2, 2] * np.arange(hu_x.shape[2]) + affine[2, 3]
    half = spacing[2] / 2
    lo, hi = z_world[0] - half, z_world[-1] + half
    crop = (lo, max(lo, z_world[lz[0]] - 5.0), min(hi, z_world[lz[-1]] + 3.0), hi)
    centre = np.array([xy[0], xy[1], (z_world[lz[0]] + z_world[lz[-1]]) / 2])
    return ChestBase(
        hu=hu_x,
        labels=lab_x,
        affine=affine,
        ids=ids,
        centre_mm=centre,
        crop_mm=crop,
        sites=_nodule_sites(lab_x, spacing, ids),
        source=source,
    )


def _close_lung_labels(hu_zyx: np.ndarray, labels_zyx: np.ndarray, lung_ids: list[int]) -> None:
    """Give the unlabelled air rim just outside the lobe masks (1-2 voxels) to the neighbouring lobe, so
    fluid or a lesion that fills a lobe does not leave a line of air along the chest wall."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[lung_ids] = lung_ids
    lobes = lut[labels_zyx]
    grown = ndi.grey_dilation(lobes, size=(1, 5, 5))
    fill = (labels_zyx == 0) & (grown > 0) & (hu_zyx < -200)
    labels_zyx[fill] = grown[fill]


def _nodule_sites(labels: np.ndarray, spacing: np.ndarray, ids: dict[str, int]) -> dict[str, np.ndarray]:
    """Candidate nodule centres per lobe, with their depth inside the lung (on a 4x coarser x-y grid)."""
    ds = labels[::4, ::4, :]
    lung = np.isin(ds, [ids[n] for n in LOBES])
    depth = ndi.distance_transform_edt(lung, sampling=spacing * [4, 4, 1])
    sites = {}
    for lobe in LOBES:
        idx = np.argwhere((ds == ids[lobe]) & (depth >= 5.0))
        sites[lobe] = np.column_stack([idx * [4, 4, 1], depth[tuple(idx.T)]]).astype(np.float64)
    return sites


# ---- per-scan geometry and anatomy ------------------------------------------------------------------


@dataclass(frozen=True)
class GeometrySpec:
    """Anatomy jitter and field of view of one scan, independent of the matrix size."""

    rotation_deg: float
    scale_xy: float
    scale_z: float
    shift_mm: tuple[float, float]
    fov_mm: float  # in-plane field of view (ReconstructionDiameter)
    z_bottom_mm: float  # the z-crop, in base world z
    z_top_mm: float


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # (x, y, z) = (W, H, D)
    affine: np.ndarray  # RAS voxel -> world
    to_base: np.ndarray  # output voxel -> base voxel

    @property
    def spacing(self) -> np.ndarray:
        return np.abs(np.diag(self.affine)[:3])


def draw_geometry(cfg: ChestSynthConfig, base: ChestBase, rng: np.random.Generator) -> GeometrySpec:
    j = cfg.scale_jitter
    s_xy, s_z = rng.uniform(1 - j, 1 + j), rng.uniform(1 - j / 2, 1 + j / 2)
    a, b, c, d = base.crop_mm
    bottom, top = rng.uniform(a, b), rng.uniform(c, d)
    fov = rng.uniform(max(340.0, 345.0 * s_xy), 400.0)
    return GeometrySpec(
        rotation_deg=float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)),
        scale_xy=float(s_xy),
        scale_z=float(s_z),
        shift_mm=tuple(rng.uniform(-cfg.shift_mm, cfg.shift_mm, 2).tolist()),
        fov_mm=float(fov),
        z_bottom_mm=float(bottom),
        z_top_mm=float(top),
    )


def output_grid(base: ChestBase, geo: GeometrySpec, shape: tuple[int, int, int]) -> Grid:
    """Output voxel grid (RAS, axis-aligned) and its map into the base volume's voxels. The voxel size
    follows from the field of view and the matrix, rounded as the metadata will state it."""
    c = base.centre_mm
    xy = round(geo.fov_mm / max(shape[:2]), 4)
    sp = np.array([xy, xy, round(geo.scale_z * (geo.z_top_mm - geo.z_bottom_mm) / shape[2], 3)])
    origin = np.array(
        [
            c[0] - (shape[0] - 1) / 2 * sp[0],
            c[1] - (shape[1] - 1) / 2 * sp[1],
            c[2] + geo.scale_z * (geo.z_bottom_mm - c[2]) + sp[2] / 2,
        ]
    )
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = origin
    t = np.deg2rad(geo.rotation_deg)
    rs = np.diag([geo.scale_xy, geo.scale_xy, geo.scale_z])
    rs[:2, :2] = geo.scale_xy * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    # base world -> output world: p' = c + R S (p - c) + shift
    fwd = np.eye(4)
    fwd[:3, :3] = rs
    fwd[:3, 3] = c - rs @ c + np.array([*geo.shift_mm, 0.0])
    to_base = np.linalg.inv(base.affine) @ np.linalg.inv(fwd) @ affine
    return Grid(shape=shape, affine=affine, to_base=to_base)


def resample_anatomy(base: ChestBase, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """HU (linear) and labels (nearest) on the output grid; z first, then each slice in-plane."""
    m = grid.to_base
    nz = base.hu.shape[2]
    bz = m[2, 2] * np.arange(grid.shape[2]) + m[2, 3]
    i0 = np.clip(np.floor(bz).astype(int), 0, nz - 2)
    w = np.clip(bz - i0, 0.0, 1.0).astype(np.float32)[:, None, None]
    hu_zyx, lab_zyx = base.hu.T, base.labels.T
    slab = hu_zyx[i0] * (1 - w) + hu_zyx[i0 + 1] * w
    lab = lab_zyx[np.clip(np.round(bz).astype(int), 0, nz - 1)]
    # cv2 maps (column, row) = (x, y) of the output slice to (x, y) of the base slice
    warp = np.array([[m[0, 0], m[0, 1], m[0, 3]], [m[1, 0], m[1, 1], m[1, 3]]])
    dsize = (grid.shape[0], grid.shape[1])
    flags = cv2.WARP_INVERSE_MAP
    hu = np.stack(
        [
            cv2.warpAffine(
                s,
                warp,
                dsize,
                flags=cv2.INTER_LINEAR | flags,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=OUTSIDE_FOV_HU,
            )
            for s in slab
        ]
    )
    labels = np.stack(
        [
            cv2.warpAffine(
                s, warp, dsize, flags=cv2.INTER_NEAREST | flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            for s in lab
        ]
    )
    # planters work on (x, y, z) arrays; C order keeps their masks, argwhere and indexing cache-friendly
    return np.ascontiguousarray(hu.T), np.ascontiguousarray(labels.T)


# ---- scans, reconstructions, volumes ------------------------------------------------------------------


@dataclass(frozen=True)
class ScanSpec:
    geometry: GeometrySpec
    findings: dict[str, dict]  # finding -> planter parameters (patient level)
    seed: int


@dataclass(frozen=True)
class ReconSpec:
    kernel: str  # "standard" | "sharp" | "soft"
    blur_mm: float
    sharpen: float
    slice_blur_mm: float  # extra z blur of a thicker reconstruction
    noise_hu: float
    offset_hu: float


@dataclass
class PlantedScan:
    hu: np.ndarray  # float32 (x, y, z), noise-free
    anatomy: np.ndarray  # uint8 labels after planting (an enlarged heart is relabelled)
    grid: Grid
    masks: dict[str, np.ndarray]
    details: dict[str, dict]


@dataclass
class SyntheticVolume:
    hu: np.ndarray  # int16 HU, (x, y, z) RAS
    affine: np.ndarray  # RAS
    finding_masks: dict[str, np.ndarray]  # planted findings only, all non-empty
    labels: dict[str, int]  # all 18 findings
    details: dict[str, dict]
    anatomy: np.ndarray
    recon: ReconSpec


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def synthesize_scan(base: ChestBase, spec: ScanSpec, shape: tuple[int, int, int]) -> PlantedScan:
    grid = output_grid(base, spec.geometry, shape)
    hu, labels = resample_anatomy(base, grid)
    canvas = Canvas(
        hu=hu, labels=labels, spacing=grid.spacing, ids=base.ids, base_to_out=np.linalg.inv(grid.to_base)
    )
    masks, details = {}, {}
    for name, planter in PLANTERS.items():
        if name not in spec.findings:
            continue
        res = planter.plant(canvas, spec.findings[name], _rng(spec.seed, finding_index(name)))
        if res is None or not res[0].any():
            log.debug("could not place %s in this scan; its label is 0", name)
            continue
        masks[name], details[name] = res
    return PlantedScan(hu=hu, anatomy=labels, grid=grid, masks=masks, details=details)


def draw_recon(cfg: ChestSynthConfig, recon_index: int, rng: np.random.Generator) -> ReconSpec:
    """Reconstruction 1 is a standard kernel, 2 a sharp lung kernel (more noise), 3 a soft kernel with a
    thicker slice profile (less noise); blur sizes are in mm, so coarse grids are hardly blurred."""
    kernel = ("standard", "sharp", "soft")[recon_index % 3]
    noise = rng.uniform(*cfg.noise_hu) * {"standard": 1.0, "sharp": 1.3, "soft": 0.7}[kernel]
    blur = {"standard": (0.25, 0.4), "sharp": (0.25, 0.35), "soft": (0.5, 0.7)}[kernel]
    return ReconSpec(
        kernel=kernel,
        blur_mm=float(rng.uniform(*blur)),
        sharpen=float(rng.uniform(0.4, 0.8)) if kernel == "sharp" else 0.0,
        slice_blur_mm=float(rng.uniform(0.6, 1.2)) if kernel == "soft" else 0.0,
        noise_hu=float(noise),
        offset_hu=float(rng.uniform(-cfg.intensity_jitter_hu, cfg.intensity_jitter_hu)),
    )


def reconstruct(scan: PlantedScan, recon: ReconSpec, rng: np.random.Generator) -> SyntheticVolume:
    """Noise, kernel, slice profile and calibration offset of one reconstruction; HU as int16."""
    img = np.ascontiguousarray(scan.hu.T)  # (z, y, x): slices are contiguous for cv2
    inside = img > OUTSIDE_FOV_HU + 500
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(recon.noise_hu)
    noise *= inside  # the outside of the reconstruction circle stays constant, as on real scanners
    img += noise
    del noise
    sx, sy, sz = scan.grid.spacing
    sig = (recon.blur_mm / sx, recon.blur_mm / sy)
    if max(sig) > 0.2:
        for k in range(img.shape[0]):
            blurred = cv2.GaussianBlur(img[k], (0, 0), sigmaX=sig[0], sigmaY=sig[1])
            img[k] = blurred + recon.sharpen * (img[k] - blurred) if recon.sharpen else blurred
    if recon.slice_blur_mm / sz > 0.2:
        img = ndi.gaussian_filter1d(img, recon.slice_blur_mm / sz, axis=0, truncate=3.0)
    img += np.float32(recon.offset_hu) * inside
    np.rint(img, out=img)
    np.clip(img, -2048, 3071, out=img)
    hu = img.astype(np.int16).T
    labels = {name: int(name in scan.masks) for name in FINDINGS}
    return SyntheticVolume(
        hu=hu,
        affine=scan.grid.affine.copy(),
        finding_masks=scan.masks,
        labels=labels,
        details=scan.details,
        anatomy=scan.anatomy,
        recon=recon,
    )


@dataclass(frozen=True)
class VolumeSpec:
    scan: ScanSpec
    recon: ReconSpec
    shape: tuple[int, int, int]


def synthesize_volume(base: ChestBase, spec: VolumeSpec, rng: np.random.Generator) -> SyntheticVolume:
    """One volume in memory (anatomy, findings, reconstruction); the generator shares scans across recons."""
    return reconstruct(synthesize_scan(base, spec.scan, spec.shape), spec.recon, rng)


def draw_volume_spec(
    cfg: ChestSynthConfig,
    base: ChestBase,
    rng: np.random.Generator,
    findings: list[str] | None = None,
    recon_index: int = 0,
) -> VolumeSpec:
    """A random volume spec; `findings` forces which findings are planted (default: by prevalence)."""
    names = (
        findings if findings is not None else [n for n in PLANTABLE if rng.random() < cfg.prevalence_of(n)]
    )
    params = {n: PLANTERS[n].draw(rng, base.sites) for n in names}
    shape = (cfg.size[1], cfg.size[0], cfg.slices)
    scan = ScanSpec(geometry=draw_geometry(cfg, base, rng), findings=params, seed=int(rng.integers(2**63)))
    return VolumeSpec(scan=scan, recon=draw_recon(cfg, recon_index, rng), shape=shape)


# ---- writing ---------------------------------------------------------------------------------------


def reorient(arr: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS array + affine -> the same image stored with axis codes `code` (affine stays correct)."""
    ornt = nib.orientations
    tr = ornt.ornt_transform(ornt.axcodes2ornt(("R", "A", "S")), ornt.axcodes2ornt(tuple(code)))
    return ornt.apply_orientation(arr, tr), affine @ ornt.inv_ornt_aff(tr, arr.shape)


def save_nifti_atomic(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write to a hidden temporary name, then rename: an interrupted run never leaves a half file."""
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(np.nan, np.nan)  # no NIfTI scaling: values on disk are what you get
    tmp = path.with_name("." + path.name.removesuffix(".nii.gz") + ".partial.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)


def masks_to_bits(masks: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    bits = np.zeros(shape, dtype=np.uint32)
    for name, m in masks.items():
        bits[m] |= np.uint32(1 << finding_index(name))
    return bits


def load_finding_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `masks/<VolumeName>` file: finding -> bool array (on-disk orientation), one per finding."""
    bits = np.asarray(nib.load(path).dataobj).astype(np.uint32)
    return {name: (bits & np.uint32(1 << k)) > 0 for k, name in enumerate(FINDINGS)}


def volume_path(out_dir: Path, name: str) -> Path:
    split, pid, scan, _ = name.removesuffix(".nii.gz").split("_")
    return out_dir / "volumes" / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".partial")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def prepare_out_dir(cfg: ChestSynthConfig) -> None:
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ValueError(
                f"out_dir {out} exists and is not empty; pass --overwrite to replace its synthetic data"
            )
        for sub in ("volumes", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in [*(f for files in SPLITS.values() for f in files), INFO_FILE]:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ---- the whole data set --------------------------------------------------------------------------


@dataclass
class SynthSummary:
    out_dir: Path
    volumes: dict[str, int]
    patients: dict[str, int]
    positives: dict[str, int]  # volumes with the finding, both splits
    seconds: float

    def line(self) -> str:
        pos = ", ".join(f"{k}: {v}" for k, v in self.positives.items() if v)
        return (
            f"wrote {self.volumes['train']} train / {self.volumes['valid']} valid volumes "
            f"({self.patients['train']} / {self.patients['valid']} patients) to {self.out_dir} in "
            f"{self.seconds:.1f} s; positives: {pos or 'none'}"
        )


def assign_splits(cfg: ChestSynthConfig) -> list[tuple[str, int]]:
    """(split, patient id) per patient; ids count from 1 within each split."""
    n = cfg.n_patients
    n_valid = round(n * cfg.valid_fraction)
    if n >= 2 and 0 < cfg.valid_fraction < 1:
        n_valid = min(max(n_valid, 1), n - 1)
    valid = set(_rng(cfg.seed, 0).permutation(n)[:n_valid].tolist())
    counters = {"train": 0, "valid": 0}
    out = []
    for g in range(n):
        split = "valid" if g in valid else "train"
        counters[split] += 1
        out.append((split, counters[split]))
    return out


def _scan_findings(
    cfg: ChestSynthConfig, present: list[str], scan_index: int, rng: np.random.Generator
) -> list[str]:
    """A later scan keeps most of the patient's findings and rarely gains one."""
    keep = rng.random(len(PLANTABLE)) < cfg.scan_keep_rate
    new = rng.random(len(PLANTABLE))
    if scan_index == 0:
        return present
    return [
        n
        for i, n in enumerate(PLANTABLE)
        if (n in present and keep[i])
        or (n not in present and new[i] < cfg.prevalence_of(n) * (1 - cfg.scan_keep_rate))
    ]


@dataclass(frozen=True)
class ScanPlan:
    """Everything drawn for one scan before anything is planted (so later draws never depend on planting)."""

    letter: str
    spec: ScanSpec
    scanner: dict
    intercept: int
    study_date: dt.date
    n_recons: int


def plan_patient(cfg: ChestSynthConfig, base: ChestBase, g: int) -> tuple[dict, list[ScanPlan]]:
    """Patient `g` (0-based over the whole set): demographics and its scans, from its own random stream."""
    prng = _rng(cfg.seed, 1, g)
    present = [n for n in PLANTABLE if prng.random() < cfg.prevalence_of(n)]
    params = {n: PLANTERS[n].draw(prng, base.sites) for n in PLANTABLE}
    patient = {"sex": str(prng.choice(["M", "F"])), "age": int(prng.integers(25, 90))}
    date = dt.date(2019, 1, 1) + dt.timedelta(days=int(prng.integers(0, 1200)))
    scans = []
    for si in range(int(prng.integers(cfg.scans_per_patient[0], cfg.scans_per_patient[1] + 1))):
        srng = _rng(cfg.seed, 2, g, si)
        names = _scan_findings(cfg, present, si, srng)
        spec = ScanSpec(
            geometry=draw_geometry(cfg, base, srng),
            findings={n: params[n] for n in names},
            seed=int(srng.integers(2**63)),
        )
        date += dt.timedelta(days=int(srng.integers(30, 400)) if si else 0)
        scans.append(
            ScanPlan(
                letter=chr(ord("a") + si),
                spec=spec,
                scanner=draw_scanner(srng),
                intercept=-8192 if srng.random() < cfg.intercept_8192_rate else -1024,
                study_date=date,
                n_recons=int(srng.integers(cfg.recons_per_scan[0], cfg.recons_per_scan[1] + 1)),
            )
        )
    return patient, scans


def write_volume(
    cfg: ChestSynthConfig, name: str, vol: SyntheticVolume, intercept: int, code: str
) -> tuple[np.ndarray, tuple]:
    """Store one volume (variant, orientation `code`) and its finding mask; return on-disk affine, shape."""
    stored = vol.hu if cfg.variant == "hu" else (vol.hu.astype(np.int32) - intercept).astype(np.int16)
    arr, affine = reorient(stored, vol.affine, code)
    path = volume_path(cfg.out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti_atomic(arr, affine, path)
    (cfg.out_dir / "masks").mkdir(exist_ok=True)
    bits, _ = reorient(masks_to_bits(vol.finding_masks, vol.hu.shape), vol.affine, code)
    save_nifti_atomic(bits, affine, cfg.out_dir / "masks" / name)
    return affine, arr.shape


def generate_chest_dataset(cfg: ChestSynthConfig) -> SynthSummary:
    """Write the whole synthetic CT-RATE set described by `cfg` and return a summary."""
    from tqdm import tqdm

    cfg.validate()
    t0 = time.perf_counter()
    prepare_out_dir(cfg)
    base = load_chest_base(cfg.size, cfg.slices, cfg.samples_dir)
    shape = (cfg.size[1], cfg.size[0], cfg.slices)
    tables: dict[str, dict[str, list]] = {s: {"metadata": [], "reports": [], "labels": []} for s in SPLITS}
    info_volumes: list[dict] = []
    plan = assign_splits(cfg)
    for g, (split, pid) in enumerate(tqdm(plan, desc="patients", unit="patient", disable=len(plan) < 4)):
        patient, scans = plan_patient(cfg, base, g)
        for sp in scans:
            planted = synthesize_scan(base, sp.spec, shape)
            report = compose_report(
                planted.details,
                _rng(cfg.seed, 4, g, ord(sp.letter)),
                z_spacing=float(planted.grid.spacing[2]),
                empty_impression_rate=cfg.empty_impression_rate,
            )
            for ri in range(sp.n_recons):
                tv = time.perf_counter()
                vrng = _rng(cfg.seed, 3, g, ord(sp.letter), ri)
                code = str(vrng.choice(cfg.orientations))
                vol = reconstruct(planted, draw_recon(cfg, ri, vrng), vrng)
                name = f"{split}_{pid}_{sp.letter}_{ri + 1}.nii.gz"
                affine, disk_shape = write_volume(cfg, name, vol, sp.intercept, code)
                t = tables[split]
                t["metadata"].append(
                    metadata_row(
                        name,
                        patient,
                        sp.scanner,
                        vol.recon.kernel,
                        affine,
                        disk_shape,
                        sp.intercept,
                        sp.study_date,
                    )
                )
                t["reports"].append({"VolumeName": name, **report})
                t["labels"].append({"VolumeName": name, **vol.labels})
                info_volumes.append(
                    {
                        "VolumeName": name,
                        "orientation": code,
                        "RescaleIntercept": sp.intercept,
                        "planted": vol.details,
                        "recon": vol.recon.__dict__,
                        "seconds": round(time.perf_counter() - tv, 3),
                    }
                )
    for split, (meta_f, rep_f, lab_f) in SPLITS.items():
        t = tables[split]
        _write_csv(pd.DataFrame(t["metadata"], columns=list(METADATA_COLUMNS)), cfg.out_dir / meta_f)
        _write_csv(pd.DataFrame(t["reports"], columns=list(REPORT_COLUMNS)), cfg.out_dir / rep_f)
        _write_csv(pd.DataFrame(t["labels"], columns=list(LABEL_COLUMNS)), cfg.out_dir / lab_f)
    summary = SynthSummary(
        out_dir=cfg.out_dir,
        volumes={s: len(tables[s]["labels"]) for s in SPLITS},
        patients={s: sum(1 for sp, _ in plan if sp == s) for s in SPLITS},
        positives={n: sum(int(r[n]) for s in SPLITS for r in tables[s]["labels"]) for n in FINDINGS},
        seconds=time.perf_counter() - t0,
    )
    _write_info(cfg, base, info_volumes, summary)
    log.debug("%s", summary.line())
    return summary


def _write_info(cfg: ChestSynthConfig, base: ChestBase, volumes: list[dict], summary: SynthSummary) -> None:
    from ctcore.cli import resolved

    info = {
        "variant": cfg.variant,
        "variant_meaning": {
            "raw": "stored = HU - RescaleIntercept (apply the metadata CSV)",
            "hu": "stored = HU (do not apply the metadata CSV)",
        }[cfg.variant],
        "config": resolved(cfg),
        "base_volume": base.source,
        "plantable": list(PLANTABLE),
        "mask_bits": {name: 1 << k for k, name in enumerate(FINDINGS)},
        "seconds": round(summary.seconds, 2),
        "volumes": volumes,
    }
    tmp = cfg.out_dir / ("." + INFO_FILE + ".partial")
    tmp.write_text(json.dumps(info, indent=1, default=float))
    os.replace(tmp, cfg.out_dir / INFO_FILE)

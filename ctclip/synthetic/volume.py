"""One synthetic chest CT volume in memory: findings planted into a scan, then one reconstruction of it.

A scan (`ScanSpec`: geometry, planter parameters, seed) is resampled and planted once (`synthesize_scan`);
its reconstructions (`ReconSpec`: kernel, noise, slice profile, calibration offset) share anatomy and
findings (`reconstruct`). `draw_volume_spec` + `synthesize_volume` make one random volume on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from ctclip.findings import FINDINGS, finding_index
from ctclip.synthetic.anatomy import ChestBase
from ctclip.synthetic.canvas import Canvas
from ctclip.synthetic.config import ChestSynthConfig
from ctclip.synthetic.geometry import (
    OUTSIDE_FOV_HU,
    GeometrySpec,
    Grid,
    draw_geometry,
    output_grid,
    resample_anatomy,
)
from ctclip.synthetic.planters import PLANTABLE, PLANTERS

log = logging.getLogger(__name__)


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


def keyed_rng(*key: int) -> np.random.Generator:
    """An independent random stream per integer key (seed, stream, ids...), stable across runs."""
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
        res = planter.plant(canvas, spec.findings[name], keyed_rng(spec.seed, finding_index(name)))
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

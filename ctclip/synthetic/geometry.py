"""Where one synthetic chest scan sits: its pose and field of view, its voxel grid, and the base CT on it.

`draw_geometry` draws a small rotation, scale, shift and z-crop of the base volume; `output_grid` makes
the axis-aligned RAS grid whose voxel size follows from the field of view and the matrix, with its map
into base voxels; `resample_anatomy` samples HU (linear) and labels (nearest) onto that grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ctclip.synthetic.anatomy import ChestBase
from ctclip.synthetic.config import ChestSynthConfig

OUTSIDE_FOV_HU = -2048.0  # value outside the reconstruction circle, as in the real sample


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

"""One CT volume from NIfTI to the stored uint8 array (DESIGN 4.2).

    stored values -> HU (ctclip.data.rescale decides how) -> RAS (closest canonical)
    -> display order (D, H, W) -> clip to hu_range -> trilinear fit into target_shape keeping the
    aspect ratio (of voxels by default, of millimetres with `spacing`) -> uint8 -> centre pad

Stored layout: D runs inferior -> superior with `slide_b2u` (superior -> inferior without), H runs
anterior -> posterior, W runs patient right -> patient left, so ``plt.imshow(vol[d])`` shows the
usual radiological axial view. uint8 u means HU = lo + u * (hi - lo) / 255 for hu_range (lo, hi);
padding holds -1000 HU (air).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ctclip.data.nifti import NiftiVolume, ras_transform
from ctclip.data.rescale import CsvRescale, HUMapping, RescaleMode, decide_hu_mapping

PAD_HU = -1000.0
LAYOUT = "D: inferior->superior (b2u) | H: anterior->posterior | W: right->left (radiological)"


@dataclass(frozen=True)
class VolumeParams:
    """What the per-volume computation needs (small and picklable, sent to workers)."""

    target_shape: tuple[int, int, int] = (160, 224, 224)
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    slide_b2u: bool = True
    rescale: RescaleMode = "auto"
    spacing: tuple[float, float, float] | None = None  # target mm along (x, y, z) before fitting

    def __post_init__(self) -> None:
        if len(self.target_shape) != 3 or min(self.target_shape) < 1:
            raise ValueError(f"target_shape must be three positive integers, got {self.target_shape}")
        lo, hi = self.hu_range
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"hu_range must be two finite numbers lo < hi, got {self.hu_range}")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing)):
            raise ValueError(f"spacing must be three positive millimetre values (x y z), got {self.spacing}")


def display_view(ras: np.ndarray, slide_b2u: bool) -> np.ndarray:
    """(X, Y, Z) RAS array -> (D, H, W) view in the stored layout (no copy)."""
    view = ras.transpose(2, 1, 0)[:, ::-1, ::-1]  # z, posterior-going rows, leftward columns
    return view if slide_b2u else view[::-1]


def fitted_shape(shape: tuple[int, int, int], voxel_mm: tuple[float, float, float],
                 target: tuple[int, int, int], spacing_mm: tuple[float, float, float] | None) -> tuple[int, ...]:
    """Shape after an aspect-preserving fit into `target`, optionally resampled to `spacing_mm` first.

    Everything here is in (D, H, W) order. One scale factor applies to all axes of the (possibly
    spacing-resampled) grid, so the shape ratios are preserved up to rounding.
    """
    grid = np.asarray(shape, dtype=np.float64)
    if spacing_mm is not None:
        grid = grid * np.asarray(voxel_mm) / np.asarray(spacing_mm)
    scale = float(np.min(np.asarray(target) / grid))
    return tuple(int(v) for v in np.clip(np.round(grid * scale), 1, target))


def quantize(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """HU already clipped to [lo, hi] -> uint8 with rounding (in place on the float array)."""
    hu -= lo
    hu *= 255.0 / (hi - lo)
    hu += 0.5
    return hu.astype(np.uint8)


def hu_of_uint8(u: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_range
    return lo + u.astype(np.float32) * np.float32((hi - lo) / 255.0)


def _slab_as_float(slab: np.ndarray) -> torch.Tensor:
    """A contiguous slab of stored values as float32 (torch converts native int16/uint8/... directly)."""
    if slab.dtype.isnative and slab.dtype.kind in "iuf" and slab.dtype.itemsize <= 4 and slab.dtype != np.uint32:
        try:
            with warnings.catch_warnings():  # read-only decompressed buffer: we only read it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(slab).to(torch.float32)
        except TypeError:  # a dtype torch does not know
            pass
    return torch.from_numpy(slab.astype(np.float32))


def clipped_resized_hu(stored: np.ndarray, mapping: HUMapping, hu_range: tuple[float, float],
                       new_shape: tuple[int, ...], slab: int = 16) -> np.ndarray:
    """HU -> clip -> trilinear resize of a C-contiguous (A, B, C) array of stored values to `new_shape`.

    Trilinear interpolation is separable: slabs along the first axis are converted, clipped and resized
    bilinearly in the (B, C) plane, then the stack is resized linearly along A. Only one float32 slab of
    the full-resolution volume exists at a time, and every read is contiguous."""
    lo, hi = hu_range
    depth = stored.shape[0]
    plane_shape = tuple(new_shape[1:])
    stack = torch.empty((depth, *plane_shape), dtype=torch.float32)
    with torch.inference_mode():
        for s in range(0, depth, slab):
            block = _slab_as_float(stored[s:s + slab])
            if mapping.slope != 1.0:
                block.mul_(mapping.slope)
            if mapping.intercept != 0.0:
                block.add_(mapping.intercept)
            block.clamp_(lo, hi)
            if tuple(block.shape[1:]) != plane_shape:
                block = F.interpolate(block[None], size=plane_shape, mode="bilinear", align_corners=False)[0]
            stack[s:s + slab] = block
        if new_shape[0] != depth:
            stack = F.interpolate(stack[None, None], size=tuple(new_shape), mode="trilinear",
                                  align_corners=False)[0, 0]
    return stack.numpy()


def preprocess_volume(vol: NiftiVolume, csv: CsvRescale | None, params: VolumeParams) -> tuple[np.ndarray, dict[str, Any]]:
    """The stored uint8 volume and the attributes that describe how it was made."""
    mapping: HUMapping = decide_hu_mapping(vol.raw, vol.scl_slope, vol.scl_inter, csv, params.rescale)
    transform, ras_affine = ras_transform(vol.affine, vol.raw.shape)
    ras_zooms = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))  # mm along R, A, S axes
    ras_shape = [0, 0, 0]
    for disk_axis, (ras_axis, _) in enumerate(transform):
        ras_shape[int(ras_axis)] = vol.raw.shape[disk_axis]
    display_shape = (ras_shape[2], ras_shape[1], ras_shape[0])
    voxel_dhw = (float(ras_zooms[2]), float(ras_zooms[1]), float(ras_zooms[0]))
    spacing_dhw = None if params.spacing is None else (params.spacing[2], params.spacing[1], params.spacing[0])
    lo, hi = params.hu_range
    new_shape = fitted_shape(display_shape, voxel_dhw, params.target_shape, spacing_dhw)

    # Resize in the on-disk axis order, where the data is contiguous, then reorient the small result:
    # resizing commutes with axis permutations and flips (align_corners=False is symmetric).
    new_ras = (new_shape[2], new_shape[1], new_shape[0])
    new_disk = tuple(new_ras[int(ras_axis)] for ras_axis, _ in transform)
    stored_c = np.ascontiguousarray(vol.raw.T)  # (k, j, i): a free view of the Fortran-ordered NIfTI data
    small = clipped_resized_hu(stored_c, mapping, (lo, hi), new_disk[::-1]).T
    hu = np.ascontiguousarray(display_view(nib.orientations.apply_orientation(small, transform), params.slide_b2u))
    content = quantize(hu, lo, hi)

    pad_value = quantize(np.array([min(max(PAD_HU, lo), hi)], dtype=np.float32), lo, hi)[0]
    out = np.full(params.target_shape, pad_value, dtype=np.uint8)
    start = tuple((t - n) // 2 for t, n in zip(params.target_shape, new_shape))
    out[tuple(slice(s, s + n) for s, n in zip(start, new_shape))] = content

    out_spacing = tuple(v * o / n for v, o, n in zip(voxel_dhw, display_shape, new_shape))
    attrs = {
        "source_path": str(vol.path),
        "original_shape": list(vol.raw.shape),
        "spacing": list(vol.zooms),
        "affine": vol.affine,
        "orientation": vol.axcodes,
        "hu_slope": mapping.slope,
        "hu_intercept": mapping.intercept,
        "rescale": mapping.source,
        "rescale_reason": mapping.reason,
        "uint8_range": [lo, hi],
        "output_spacing": list(out_spacing),
        "content_start": list(start),
        "content_shape": list(new_shape),
    }
    return out, attrs

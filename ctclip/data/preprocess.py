"""One CT volume from NIfTI to the stored uint8 array (DESIGN 4.2).

    stored values -> HU (ctclip.data.rescale decides how) -> RAS (closest canonical) -> (z, y, x)
    -> clip to hu_range -> trilinear fit into target_shape keeping the aspect ratio (of voxels by
    default, of millimetres with `spacing`) -> centre pad with air -> uint8 -> the stored layout

Stored layouts (`layout`), in nibabel's axis codes of the stored (D, H, W) array, i.e. the direction
each index runs towards:

    seed          S P R  D inferior->superior, H anterior->posterior, W patient left->right: what the
                         seed's run_preprocess.py stores with its defaults (the RAS array transposed,
                         rows flipped); ``imshow(vol[d])`` shows the axial slice as seen from above
    radiological  S P L  W patient right->left: the usual radiological axial view

`slide_b2u=False` reverses D (I instead of S). The codes are recorded in the store's config
(``layout_codes``) and in training checkpoints, so stores and models of different layouts are never
mixed silently.

The numbers follow the seed's recipe exactly (tests/test_ctclip_preprocess.py restates it as the
oracle and compares bytes): HU clipped in float64 and cast to float32, PyTorch's trilinear kernel
(applied in two passes, in-plane per slab then along D, which gives the same bits with bounded
memory), padding at -1000 HU, then uint8 = trunc(((HU - c) / r + 1) / 2 * 255) in float32 for the
hu_range centre c and half-width r (`quantize="round"` rounds instead). uint8 u thus covers
HU in [lo + u * s, lo + (u + 1) * s) for s = (hi - lo) / 255.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from ctclip.data.nifti import NiftiVolume, ras_transform
from ctclip.data.rescale import CsvRescale, HUMapping, RescaleMode, decide_hu_mapping

PAD_HU = -1000.0
Layout = Literal["seed", "radiological"]
Quantize = Literal["trunc", "round"]
LAYOUTS: tuple[str, ...] = ("seed", "radiological")
QUANTIZE: tuple[str, ...] = ("trunc", "round")


def layout_codes(layout: str, slide_b2u: bool = True) -> str:
    """Axis codes of the stored (D, H, W) array, e.g. 'SPR' for the seed's layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return ("S" if slide_b2u else "I") + "P" + ("R" if layout == "seed" else "L")


_AXIS_WORDS = {"S": "inferior->superior", "I": "superior->inferior", "P": "anterior->posterior",
               "A": "posterior->anterior", "R": "patient left->right", "L": "patient right->left"}


def describe_codes(codes: str) -> str:
    """'SPR' -> 'D inferior->superior, H anterior->posterior, W patient left->right'."""
    return ", ".join(f"{axis} {_AXIS_WORDS.get(c, '?')}" for axis, c in zip("DHW", codes))


def layout_flags(codes: str) -> str:
    """The ctclip_preprocess.py flags that store `codes` ('' for the defaults), or a note when none do."""
    for layout in LAYOUTS:
        for b2u in (True, False):
            if layout_codes(layout, b2u) == codes:
                flags = ([] if layout == "seed" else [f"--layout {layout}"]) + ([] if b2u else ["--no-slide_b2u"])
                return " ".join(flags) or "the default --layout seed"
    return f"no ctclip_preprocess.py setting (layout {codes})"


def check_layout(store: str, store_codes: str, model: str, model_codes: str | None) -> str | None:
    """None when a store and a model agree on the stored layout, else the reason to refuse. A model that
    recorded no layout (trained before layouts were recorded) cannot be checked: None."""
    if model_codes is None or store_codes == model_codes:
        return None
    return (f"{store} stores volumes as {store_codes} ({describe_codes(store_codes)}), but {model} was trained on "
            f"{model_codes} ({describe_codes(model_codes)}): the model would see mirrored or flipped anatomy. "
            f"Preprocess the volumes again with {layout_flags(model_codes)}, or use a model trained on this layout")


@dataclass(frozen=True)
class VolumeParams:
    """What the per-volume computation needs (small and picklable, sent to workers)."""

    target_shape: tuple[int, int, int] = (160, 224, 224)
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    slide_b2u: bool = True
    rescale: RescaleMode = "auto"
    spacing: tuple[float, float, float] | None = None  # target mm along (x, y, z) before fitting
    layout: Layout = "seed"
    quantize: Quantize = "trunc"

    def __post_init__(self) -> None:
        if len(self.target_shape) != 3 or min(self.target_shape) < 1:
            raise ValueError(f"target_shape must be three positive integers, got {self.target_shape}")
        lo, hi = self.hu_range
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"hu_range must be two finite numbers lo < hi, got {self.hu_range}")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing)):
            raise ValueError(f"spacing must be three positive millimetre values (x y z), got {self.spacing}")
        layout_codes(self.layout)
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")

    @property
    def codes(self) -> str:
        return layout_codes(self.layout, self.slide_b2u)


def stored_view(zyx: np.ndarray, layout: str, slide_b2u: bool) -> np.ndarray:
    """(z, y, x) array of the RAS volume (D, H, W running S, A, R) -> the stored layout (a view)."""
    d = slice(None) if slide_b2u else slice(None, None, -1)
    w = slice(None) if layout == "seed" else slice(None, None, -1)
    return zyx[d, ::-1, w]


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


def quantize(hu: np.ndarray, lo: float, hi: float, mode: str = "trunc") -> np.ndarray:
    """float32 HU -> uint8 as the seed computes it (in place on `hu`): ((HU - c) / r + 1) / 2 * 255,
    clipped to [0, 255], truncated (or rounded) for centre c and half-width r of [lo, hi]."""
    centre, half = np.float32((lo + hi) / 2.0), np.float32((hi - lo) / 2.0)
    if centre != 0:
        hu -= centre
    hu /= half
    hu += np.float32(1.0)
    hu /= np.float32(2.0)
    hu *= np.float32(255.0)
    np.clip(hu, 0, 255, out=hu)
    if mode == "round":
        hu += np.float32(0.5)
    return hu.astype(np.uint8)


def hu_of_uint8(u: np.ndarray, hu_range: tuple[float, float]) -> np.ndarray:
    lo, hi = hu_range
    return lo + u.astype(np.float32) * np.float32((hi - lo) / 255.0)


def _exact_in_float32(dtype: np.dtype, mapping: HUMapping) -> bool:
    """True when slope * stored + intercept is exact in float32 for every value of `dtype` (integers
    of at most 16 bits and integral slope/intercept keep |HU| far below 2**24)."""
    integral = float(mapping.slope).is_integer() and float(mapping.intercept).is_integer()
    small = abs(mapping.slope) * 65536 + abs(mapping.intercept) < 2 ** 24
    return dtype.kind in "iu" and dtype.itemsize <= 2 and integral and small


def _slab_to_hu(slab: np.ndarray, mapping: HUMapping, lo: float, hi: float, exact32: bool) -> torch.Tensor:
    """A slab of stored values -> clipped float32 HU, with the value float64 arithmetic gives."""
    dtype = torch.float32 if exact32 else torch.float64
    if slab.dtype.isnative and slab.dtype.kind in "iuf" and slab.dtype.itemsize <= 4 and slab.dtype != np.uint32:
        block = torch.from_numpy(np.ascontiguousarray(slab)).to(dtype)
    else:  # byte-swapped or a dtype torch does not know
        block = torch.from_numpy(np.ascontiguousarray(slab).astype(np.float32 if exact32 else np.float64))
    if mapping.slope != 1.0:
        block.mul_(mapping.slope)
    if mapping.intercept != 0.0:
        block.add_(mapping.intercept)
    return block.clamp_(lo, hi).to(torch.float32)


def clipped_resized_hu(zyx: np.ndarray, mapping: HUMapping, hu_range: tuple[float, float],
                       new_shape: tuple[int, ...], slab: int = 16) -> np.ndarray:
    """HU -> clip -> trilinear resize of a (z, y, x) array (any strides) of stored values to `new_shape`.

    Trilinear interpolation is separable, and PyTorch's trilinear kernel applied twice (slabs along z
    resized in-plane with z kept, then the stack resized along z with y, x kept) gives the same bits
    as one call on the whole volume (a weight of exactly 1 and 0 on the kept axes); the 2D bilinear
    kernel does not always. Only one slab of the full-resolution volume exists in float at a time."""
    lo, hi = hu_range
    depth = zyx.shape[0]
    plane_shape = tuple(new_shape[1:])
    exact32 = _exact_in_float32(zyx.dtype, mapping)
    stack = torch.empty((depth, *plane_shape), dtype=torch.float32)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # we only read it
        for s in range(0, depth, slab):
            block = _slab_to_hu(zyx[s:s + slab], mapping, lo, hi, exact32)
            if tuple(block.shape[1:]) != plane_shape:
                block = F.interpolate(block[None, None], size=(block.shape[0], *plane_shape), mode="trilinear",
                                      align_corners=False)[0, 0]
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
    zyx = nib.orientations.apply_orientation(vol.raw, transform).transpose(2, 1, 0)  # a view
    voxel_dhw = (float(ras_zooms[2]), float(ras_zooms[1]), float(ras_zooms[0]))
    spacing_dhw = None if params.spacing is None else (params.spacing[2], params.spacing[1], params.spacing[0])
    lo, hi = params.hu_range
    new_shape = fitted_shape(zyx.shape, voxel_dhw, params.target_shape, spacing_dhw)

    # Resized in the seed's frame (RAS transposed): flips and axis order change the kernel's rounding,
    # so the stored layout is applied to the finished uint8 array, as the seed does.
    content = quantize(clipped_resized_hu(zyx, mapping, (lo, hi), new_shape), lo, hi, params.quantize)
    pad_value = quantize(np.array([min(max(PAD_HU, lo), hi)], dtype=np.float32), lo, hi, params.quantize)[0]
    padded = np.full(params.target_shape, pad_value, dtype=np.uint8)
    start = [(t - n) // 2 for t, n in zip(params.target_shape, new_shape)]
    padded[tuple(slice(s, s + n) for s, n in zip(start, new_shape))] = content
    out = np.ascontiguousarray(stored_view(padded, params.layout, params.slide_b2u))
    for axis, code in enumerate(params.codes):
        if code in "IPL":  # axes flipped from the (z, y, x) frame: the content moves with them
            start[axis] = params.target_shape[axis] - new_shape[axis] - start[axis]

    out_spacing = tuple(v * o / n for v, o, n in zip(voxel_dhw, zyx.shape, new_shape))
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

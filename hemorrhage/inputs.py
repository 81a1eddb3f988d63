"""Model inputs: one DICOM slice -> windowed uint8, and the original's recipe from windowed slices to CNN inputs.

    h, img, fixed = slice_image(path, spec)       # decode, HU (BitsStored-12 fix), window -> uint8 (H, W) or (H, W, 3)
    img = to_input_size(img, 256)                 # the original's two-step resize (512 x 512 grid, then 256)
    idx = neighbour_indices(n_slices)             # (S, 3) [s+1, s, s-1], edge slices repeat themselves
    x = model_inputs(images, 256, settings, key)  # uint8 (P, S, 3, 256, 256): stacked, cropped or TTA-drawn

The one place of the recipe: preparation and the study figure window with `slice_image`; inference,
validation and feature extraction build their inputs with `model_inputs` (in the DataLoader workers of
`hemorrhage.inference_data.SeriesInputs`); training stacks `neighbour_indices` of `to_input_size` slices
before its augmentations (`hemorrhage.train_data`).

The first-place models see three neighbouring slices as the three channels, `[s+1, s, s-1]`, where
an edge slice stands in for its missing neighbour (DESIGN 5); in the three-window mode the channels
are instead the brain / subdural / bone windows of the slice itself. Everything stays uint8 until the
model normalises on the device.

Resizing follows the original in two steps (`to_input_size`). Its dataset resized every slice to
512 x 512 when it stacked the three neighbours (``cv2.resize(image, (512, 512))``, cv2's default
bilinear), and its predictor and training transform then resized the stacked 512 x 512 x 3 image to the
model's size (cv2 bilinear again). A 512 x 512 slice therefore goes through one resize, exactly as
before; any other size goes to the 512 grid first. One resize straight to the model size is not the same
(cv2 5.0, 256-px inputs): from 128 x 128 slices 4-5% of the values differ by 1 grey level (14% in a bone
window; 6.6%, by up to 2, after the centre crop); from 600 x 600 slices about a fifth differ, by up to
104 at the skull's edges (a third after the crop), since cv2's bilinear downscale reads the 2 x 2 pixels
nearest each output and the two routes read different ones. cv2 resizes the channels of a 3-channel
image independently, so resizing each slice before stacking gives the same bytes as resizing the stack,
and a slice shared by three stacks is resized once.

At test time (``2DNet/src/predict.py``), after the resize and the stacking:
- no TTA (``--tta 0``) and the flip set: a centre crop of 0.8 resized back (the original's "center"
  prediction; its validation during training used the same crop, so the published weights expect it);
- random TTA (``--tta N``, the original used 10): N passes of channel reversal (p 0.5), horizontal flip
  (p 0.5) and a random crop of 0.6-0.99 resized back, drawn from a generator seeded by (seed, series,
  size, pass) so that results do not depend on worker scheduling.
The deterministic flip set (identity, flip, channel reversal, both) is applied on the device
(`hemorrhage.ensemble`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hemorrhage.augment import augment_tta, center_crop_resize, rng_for
from hemorrhage.dicom import DicomHeader, DicomReadError, hu_values, read_pixels, stored_values
from hemorrhage.windows import WindowSpec, render, render_stored

STACK_GRID = 512  # the original's dataset resized every slice to 512 x 512 before stacking neighbours
# the recipe of to_input_size, as features and sequence heads record it
RESIZE_RECIPE = "each slice to 512x512, then the model size"
CENTER_CROP = 0.8  # the original's inference crop (cropping(ratio=0.8, code=0))
RANDOM_TTA_PASSES = 10  # the original's num_aug


# ----------------------------------------------------------------------------------------- one slice


def slice_image(path: str | Path, spec: WindowSpec, fix_quirk: bool = True
                ) -> tuple[DicomHeader, np.ndarray, bool]:
    """(header, uint8 image, quirk_fixed) of one file: decode, HU, window (see hemorrhage.windows).

    Integer stored values with a finite rescale go through `render_stored` (a table over the stored
    range, same bytes); anything else through HU per pixel and `render`.
    """
    h, raw = read_pixels(path)
    if raw.ndim != 2:
        raise DicomReadError(path, f"not a single 2D slice (pixel array {raw.shape})")
    values, slope, intercept, fixed = stored_values(raw, h, fix_quirk=fix_quirk, original_int=spec.original_int)
    img = None
    if np.isfinite(slope) and np.isfinite(intercept):
        img = render_stored(values, lambda v: hu_values(v, slope, intercept), spec, h.window_center, h.window_width)
    if img is None:
        img = render(hu_values(values, slope, intercept), spec, h.window_center, h.window_width)
    return h, img, fixed


# ----------------------------------------------------------------------------------------- resize, neighbours


def neighbour_indices(n_slices: int) -> np.ndarray:
    """(S, 3) slice indices [s+1, s, s-1], clipped at the ends (edge slices repeat themselves)."""
    if n_slices < 1:
        raise ValueError("a series needs at least one slice")
    s = np.arange(n_slices)
    return np.clip(np.stack([s + 1, s, s - 1], axis=1), 0, n_slices - 1)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> (h, w[, C]), cv2 bilinear; an image already of that size is returned as is."""
    h, w = _hw(size)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def to_stack_grid(img: np.ndarray) -> np.ndarray:
    """The original's first step: one slice on the 512 x 512 grid it stacked neighbours on."""
    return resize_image(img, STACK_GRID)


def to_input_size(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """One windowed slice (H, W) or (H, W, 3) -> the model's size, in the original's two steps:
    the 512 x 512 stacking grid (a no-op for 512 x 512 slices), then the model size."""
    return resize_image(to_stack_grid(img), size)


# ----------------------------------------------------------------------------------------- test-time inputs


@dataclass(frozen=True)
class TTASpec:
    mode: str = "none"  # none | flip | random
    passes: int = 1  # random: passes drawn in the workers

    @property
    def device_passes(self) -> int:
        return 4 if self.mode == "flip" else 1

    @property
    def total_passes(self) -> int:
        return self.passes * self.device_passes

    def describe(self) -> str:
        return {"none": "none (centre crop 0.8)",
                "flip": "flip set: identity, hflip, channel reversal, both (centre crop 0.8)"}.get(
            self.mode, f"{self.passes} random passes: channel reversal, hflip, crop 0.6-0.99")


def parse_tta(text: str | int) -> TTASpec:
    """'0' / 'none': one centre-crop pass; 'flip': the deterministic set; N > 0 or 'random[:N]': N random passes."""
    t = str(text).strip().lower()
    if t in ("0", "none", "off", "center"):
        return TTASpec("none", 1)
    if t == "flip":
        return TTASpec("flip", 1)
    if t.startswith("random"):
        n = t.partition(":")[2] or str(RANDOM_TTA_PASSES)
    else:
        n = t
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--tta {text!r}: expected 0 (none), flip, a number of random passes (the original "
                         f"used {RANDOM_TTA_PASSES}) or random:N")
    return TTASpec("random", int(n))


@dataclass(frozen=True)
class InputSettings:
    spec: WindowSpec  # DICOM input only
    sizes: tuple[int, ...] = (256,)
    tta: TTASpec = TTASpec()
    center_crop: float = CENTER_CROP
    fix_quirk: bool = True
    seed: int = 0


def model_inputs(images: list[np.ndarray], size: int, s: InputSettings, key: str) -> np.ndarray:
    """uint8 (P, S, 3, size, size): the passes drawn in the worker (1 unless random TTA).

    `images` may already be on the 512 x 512 stacking grid (`to_stack_grid`), which then costs nothing."""
    resized = [to_input_size(img, size) for img in images]
    three = resized[0].ndim == 3
    if s.tta.mode == "random":
        out = np.empty((s.tta.passes, len(resized), 3, size, size), np.uint8)
        stack = np.stack(resized)  # (S, h, w) or (S, h, w, 3)
        per_slice = stack if three else np.moveaxis(stack[neighbour_indices(len(stack))], 1, -1)
        for p in range(s.tta.passes):
            rng = rng_for(s.seed, key, size, p)
            for i, img in enumerate(per_slice):
                out[p, i] = np.moveaxis(augment_tta(np.ascontiguousarray(img), rng), -1, 0)
        return out
    if s.center_crop < 1.0:
        resized = [center_crop_resize(img, s.center_crop) for img in resized]
    stack = np.stack(resized)
    x = np.moveaxis(stack, -1, 1) if three else stack[neighbour_indices(len(stack))]
    return np.ascontiguousarray(x)[None]

"""Model inputs from a windowed series: the original's three adjacent slices, resized, kept uint8.

    stack = ...                                   # uint8 (S, H, W), slices in position order
    x = series_inputs(stack, size=256)            # uint8 (S, 3, 256, 256): channel c of slice s = [s+1, s, s-1]
    img = to_input_size(slice_img, 256)           # one slice (H, W) or three windows (H, W, 3) -> 256 x 256

The first-place models see three neighbouring slices as the three channels, `[s+1, s, s-1]`, where
an edge slice stands in for its missing neighbour (DESIGN 5); in the three-window mode the channels
are instead the brain / subdural / bone windows of the slice itself (`window_inputs`). Everything
stays uint8 until the model normalises on the device.

Resizing follows the original in two steps (`to_input_size`, the one place the recipe lives; inference,
validation, feature extraction and training all call it). Its dataset resized every slice to 512 x 512
when it stacked the three neighbours (``cv2.resize(image, (512, 512))``, cv2's default bilinear), and its
predictor and training transform then resized the stacked 512 x 512 x 3 image to the model's size (cv2
bilinear again). A 512 x 512 slice therefore goes through one resize, exactly as before; any other size
goes to the 512 grid first. One resize straight to the model size is not the same (cv2 5.0, 256-px
inputs): from 128 x 128 slices 4-5% of the values differ by 1 grey level (14% in a bone window; 6.6%,
by up to 2, after the centre crop); from 600 x 600 slices about a fifth differ, by up to 104 at the
skull's edges (a third after the crop), since cv2's bilinear downscale reads the 2 x 2 pixels nearest
each output and the two routes read different ones. cv2 resizes the channels of a 3-channel image
independently, so resizing each slice before stacking gives the same bytes as resizing the stack, and a
slice shared by three stacks is resized once.
"""

from __future__ import annotations

import cv2
import numpy as np

STACK_GRID = 512  # the original's dataset resized every slice to 512 x 512 before stacking neighbours


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


def resize_stack(stack: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (S, H, W) -> (S, h, w): `to_input_size` of every slice."""
    h, w = _hw(size)
    if stack.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) stack, got shape {stack.shape}")
    if stack.shape[1:] == (h, w) == (STACK_GRID, STACK_GRID):
        return stack
    out = np.empty((stack.shape[0], h, w), dtype=stack.dtype)
    for i, image in enumerate(stack):  # one cv2 call per slice: cv2's resize of many channels rounds otherwise
        out[i] = to_input_size(image, (h, w))
    return out


def series_inputs(stack: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (S, H, W) windowed slices in position order -> uint8 (S, 3, h, w) model inputs."""
    resized = resize_stack(stack, size)
    return resized[neighbour_indices(len(resized))]


def window_inputs(windows: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (S, 3, H, W) three windows per slice -> uint8 (S, 3, h, w) (the three-window recipe)."""
    if windows.ndim != 4 or windows.shape[1] != 3:
        raise ValueError(f"expected (slices, 3 windows, rows, columns), got shape {windows.shape}")
    s, c, hh, ww = windows.shape
    resized = resize_stack(windows.reshape(s * c, hh, ww), size)
    return resized.reshape(s, c, *resized.shape[1:])

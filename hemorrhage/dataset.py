"""Model inputs from a windowed series: the original's three adjacent slices, resized, kept uint8.

    stack = ...                                   # uint8 (S, H, W), slices in position order
    x = series_inputs(stack, size=256)            # uint8 (S, 3, 256, 256): channel c of slice s = [s+1, s, s-1]

The first-place models see three neighbouring slices as the three channels, `[s+1, s, s-1]`, where
an edge slice stands in for its missing neighbour (DESIGN 5); in the three-window mode the channels
are instead the brain / subdural / bone windows of the slice itself (`window_inputs`). Resizing is
cv2 bilinear per slice as in the original, and everything stays uint8 until the model normalises
on the device.
"""

from __future__ import annotations

import cv2
import numpy as np


def neighbour_indices(n_slices: int) -> np.ndarray:
    """(S, 3) slice indices [s+1, s, s-1], clipped at the ends (edge slices repeat themselves)."""
    if n_slices < 1:
        raise ValueError("a series needs at least one slice")
    s = np.arange(n_slices)
    return np.clip(np.stack([s + 1, s, s - 1], axis=1), 0, n_slices - 1)


def resize_stack(stack: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (S, H, W) -> (S, h, w), cv2 bilinear on each slice as the original did.

    One cv2 call per slice on purpose: cv2's multi-channel resize (slices as channels) rounds some
    pixels differently by 1 and is limited to a few hundred channels, and the per-call overhead is
    small next to decoding the slice's file."""
    h, w = (size, size) if isinstance(size, int) else size
    if stack.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) stack, got shape {stack.shape}")
    if stack.shape[1:] == (h, w):
        return stack
    out = np.empty((stack.shape[0], h, w), dtype=stack.dtype)
    for i, image in enumerate(stack):
        out[i] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
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

"""Model inputs: neighbour order, edge repetition, and the original's two-step resize restated as the oracle.

The oracle (`original_inputs`) is the first-place code's recipe written out with plain cv2 calls: its
dataset read each slice and resized it to 512 x 512 (``cv2.resize(image, (512, 512))``, cv2's default
bilinear), concatenated ``[s+1, s, s-1]`` as the channels of one image, and its predictor resized that
image to the model size (``cv2.resize(image_cat, (size, size))``), cropped the centre 0.8 (``int(side *
0.8)`` from ``(side - target) // 2``) and resized the crop back. Our inputs must equal it byte for byte,
whatever the slice size; 512 x 512 slices must keep the single resize they always had.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hemorrhage.inputs import (
    STACK_GRID,
    InputSettings,
    model_inputs,
    neighbour_indices,
    parse_tta,
    to_input_size,
)
from hemorrhage.windows import parse_window_spec


def original_stack(slices: list[np.ndarray], s: int) -> np.ndarray:
    """The original dataset's image for slice s: every slice to 512 x 512, [s+1, s, s-1] as HWC channels."""
    n = len(slices)
    up, down = min(s + 1, n - 1), max(s - 1, 0)
    image = cv2.resize(slices[s], (512, 512))
    image_up = cv2.resize(slices[up], (512, 512))
    image_down = cv2.resize(slices[down], (512, 512))
    return np.concatenate([image_up[:, :, None], image[:, :, None], image_down[:, :, None]], 2)


def original_inputs(slices: list[np.ndarray], size: int, crop: float = 1.0) -> np.ndarray:
    """uint8 (S, 3, size, size): the stack resized to the model size, then (crop < 1) the centre crop resized back."""
    out = []
    for s in range(len(slices)):
        image_cat = cv2.resize(original_stack(slices, s), (size, size))
        if crop < 1.0:
            h, w, _ = image_cat.shape
            th, tw = int(h * crop), int(w * crop)
            y, x = (h - th) // 2, (w - tw) // 2
            image_cat = cv2.resize(image_cat[y:y + th, x:x + tw, :], (w, h))
        out.append(image_cat.transpose(2, 0, 1))
    return np.stack(out)


def settings(size: int, crop: float = 1.0) -> InputSettings:
    """No TTA; crop 1 leaves the stacked inputs uncropped."""
    return InputSettings(parse_window_spec("header"), (size,), parse_tta("0"), center_crop=crop)


def head_like(n: int, side: int | tuple[int, int], seed: int) -> list[np.ndarray]:
    """Slices with smooth tissue, a sharp bright rim and noise: both interpolation regimes are exercised."""
    rng = np.random.default_rng(seed)
    h, w = (side, side) if isinstance(side, int) else side
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (0.4 * h), (xx - w / 2) / (0.35 * w))
    out = []
    for k in range(n):
        img = np.where(r < 0.9, 90 + 30 * np.sin(xx / 7.0 + k) + 20 * np.cos(yy / 11.0), 0)
        img = np.where((r >= 0.9) & (r < 1.0), 255, img) + rng.normal(0, 6, (h, w))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_neighbours_are_next_self_previous_with_edges_repeated():
    np.testing.assert_array_equal(neighbour_indices(4), [[1, 0, 0], [2, 1, 0], [3, 2, 1], [3, 3, 2]])
    np.testing.assert_array_equal(neighbour_indices(1), [[0, 0, 0]])  # a one-slice series works
    with pytest.raises(ValueError):
        neighbour_indices(0)


@pytest.mark.parametrize("side", [128, 600, (512, 600), 256])
@pytest.mark.parametrize("size", [256, 64])
def test_inputs_equal_the_original_two_steps(side, size):
    slices = head_like(5, side, seed=1)
    ours = model_inputs(slices, size, settings(size), "series")
    assert ours.dtype == np.uint8 and ours.shape == (1, 5, 3, size, size)
    np.testing.assert_array_equal(ours[0], original_inputs(slices, size))


@pytest.mark.parametrize("side", [128, 600])
def test_one_resize_is_not_the_original(side):
    """Why the grid step is kept: straight to 256 px differs from the original's inputs."""
    slices = head_like(3, side, seed=2)
    one_step = np.stack([cv2.resize(s, (256, 256), interpolation=cv2.INTER_LINEAR) for s in slices])
    assert not np.array_equal(one_step[neighbour_indices(3)], original_inputs(slices, 256))


@pytest.mark.parametrize("size", [256, 512, 64])
def test_512_slices_keep_their_single_resize(size):
    slices = head_like(4, 512, seed=3)
    once = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR) for s in slices])
    np.testing.assert_array_equal(np.stack([to_input_size(s, size) for s in slices]), once)
    assert to_input_size(slices[0], STACK_GRID) is slices[0]  # no copy, no resample at 512


@pytest.mark.parametrize("side", [128, 600])
@pytest.mark.parametrize("crop", [0.8, 1.0])
def test_inference_worker_inputs_equal_the_original(side, crop):
    """`model_inputs` (the DataLoader worker of inference, validation and feature extraction), with the
    prediction's centre crop after the resize to the model size."""
    slices = head_like(6, side, seed=4)
    ours = model_inputs(slices, 256, settings(256, crop), "series")
    assert ours.shape == (1, 6, 3, 256, 256)
    np.testing.assert_array_equal(ours[0], original_inputs(slices, 256, crop))


def test_three_window_inputs_keep_the_window_channels():
    """Three-window images (H, W, 3): the channels are the windows, each resized in the two steps."""
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, size=(3, 3, 20, 20), dtype=np.uint8)
    x = model_inputs(list(np.moveaxis(w, 1, -1)), 10, settings(10), "series")[0]
    assert x.shape == (3, 3, 10, 10)
    for s in range(3):
        for c in range(3):
            grid = cv2.resize(w[s, c], (512, 512), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(x[s, c], cv2.resize(grid, (10, 10), interpolation=cv2.INTER_LINEAR))

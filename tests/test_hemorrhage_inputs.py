"""Model inputs: neighbour order, edge repetition, resize identical to the original's cv2 calls."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hemorrhage.dataset import neighbour_indices, resize_stack, series_inputs, window_inputs


def test_neighbours_are_next_self_previous_with_edges_repeated():
    np.testing.assert_array_equal(neighbour_indices(4), [[1, 0, 0], [2, 1, 0], [3, 2, 1], [3, 3, 2]])
    np.testing.assert_array_equal(neighbour_indices(1), [[0, 0, 0]])  # a one-slice series works
    with pytest.raises(ValueError):
        neighbour_indices(0)


@pytest.mark.parametrize("n_slices", [1, 7])
def test_resize_matches_slice_by_slice_cv2(n_slices):
    rng = np.random.default_rng(n_slices)
    stack = rng.integers(0, 256, size=(n_slices, 40, 52), dtype=np.uint8)
    ours = resize_stack(stack, (64, 48))
    reference = np.stack([cv2.resize(s, (48, 64), interpolation=cv2.INTER_LINEAR) for s in stack])
    assert ours.dtype == np.uint8 and ours.shape == (n_slices, 64, 48)
    np.testing.assert_array_equal(ours, reference)


def test_series_inputs_channels_are_the_neighbours():
    stack = np.arange(5, dtype=np.uint8)[:, None, None] * np.ones((1, 8, 8), np.uint8)
    x = series_inputs(stack, 8)
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, :, 0, 0], [[1, 0, 0], [2, 1, 0], [3, 2, 1], [4, 3, 2], [4, 4, 3]])


def test_window_inputs_keep_the_window_channels():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, size=(3, 3, 20, 20), dtype=np.uint8)
    x = window_inputs(w, 10)
    for s in range(3):
        for c in range(3):
            np.testing.assert_array_equal(x[s, c], cv2.resize(w[s, c], (10, 10), interpolation=cv2.INTER_LINEAR))
    with pytest.raises(ValueError, match="3 windows"):
        window_inputs(w[:, :2], 10)

"""Slice montages: a PNG with one colour per region, and a clear error when there is nothing to draw."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from ctcore.montage import Panel, save_montage, window_to_unit


def test_window_to_unit():
    np.testing.assert_allclose(window_to_unit(np.array([-1000.0, 40.0, 80.0, 2000.0]), 40, 80), [0, 0.5, 1, 1])


def test_montage_draws_outlines(tmp_path):
    img = np.zeros((64, 64))
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    png = save_montage([Panel(img, "a", (40, 80), {"bleed": mask}), Panel(img, "b")], tmp_path / "m.png")
    pixels = mpimg.imread(png)
    coloured = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    assert coloured.max() > 0.3  # the outline (and legend) are in colour on a grey image


def test_montage_needs_panels(tmp_path):
    with pytest.raises(ValueError, match="no panels"):
        save_montage([], tmp_path / "m.png")

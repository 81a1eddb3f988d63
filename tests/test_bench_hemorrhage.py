"""The benchmark's own pieces: member parsing and the original's PNG dataset (no models, no DICOM)."""

import argparse

import cv2
import numpy as np
import pytest

from benchmarks.bench_hemorrhage import PngSlices, parse_member


def test_parse_member():
    assert parse_member("DenseNet121_change_avg=512") == ("DenseNet121_change_avg", 512)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_member("DenseNet121_change_avg")


def test_png_slices_neighbours_crop_and_normalisation(tmp_path):
    paths = []
    for v in (10, 20, 30):  # three constant slices: each channel shows which slice it came from
        paths.append(str(tmp_path / f"{v}.png"))
        cv2.imwrite(paths[-1], np.full((40, 40), v, np.uint8))
    ds = PngSlices([paths], size=32)
    assert len(ds) == 3
    first, middle = ds[0].numpy(), ds[1].numpy()
    assert first.shape == (3, 32, 32) and first.dtype == np.float32
    norm = lambda v: (v / 255 - 0.456) / 0.224  # noqa: E731
    np.testing.assert_allclose(first[:, 0, 0], [norm(20), norm(10), norm(10)], rtol=1e-6)  # [s+1, s, s-1], edge
    np.testing.assert_allclose(middle[:, 5, 5], [norm(30), norm(20), norm(10)], rtol=1e-6)

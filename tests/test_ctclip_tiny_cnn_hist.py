"""The tiny_cnn slice encoder's intensity-histogram branch (`slice_hist_bins`, ctclip/models/tiny_cnn.py).

The oracle is numpy's `np.histogram` on the slice's HU (the store's uint8 mapped back to -1000..1000 HU),
one per cell of `np.array_split` of the rows and the columns: an independent restatement of "the fraction
of each region's pixels in each of N equal HU bins".
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ctclip.models import create_model, get_model_config
from ctclip.models.slice_encoder import build_slice_encoder


def oracle(slice_u8: np.ndarray, bins: int, grid: int) -> np.ndarray:
    hu = -1000.0 + slice_u8.astype(np.float64) * (2000.0 / 255.0)
    out = []
    for rows in np.array_split(np.arange(hu.shape[0]), grid):
        for cols in np.array_split(np.arange(hu.shape[1]), grid):
            cell = hu[np.ix_(rows, cols)]
            counts, _ = np.histogram(cell, bins=bins, range=(-1000.0, 1000.0))
            out.append(np.sqrt(counts / cell.size))
    return np.concatenate(out)


@pytest.mark.parametrize(("size", "bins", "grid"), [(32, 32, 2), (32, 16, 3), (30, 8, 1)])
def test_histograms_match_numpy_per_region(size, bins, grid):
    enc = build_slice_encoder("tiny_cnn", image_size=size, slice_norm="window", hist_bins=bins, hist_grid=grid)
    g = np.random.default_rng(size + bins)
    # real CT-like content: air, lung, fat, soft tissue, bone, and every stored level at least once
    u8 = g.choice([0, 3, 25, 115, 133, 140, 240, 255], size=(5, size, size)).astype(np.uint8)
    u8[0].flat[:256] = np.arange(256)
    x = enc.preprocess(torch.from_numpy(u8).unsqueeze(1))
    got = enc.backbone.histograms(x).numpy()
    want = np.stack([oracle(s, bins, grid) for s in u8])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (5, grid * grid * bins)


def test_histograms_see_how_much_not_where_within_a_region():
    enc = build_slice_encoder("tiny_cnn", image_size=16, slice_norm="window", hist_bins=8, hist_grid=2)
    u8 = torch.full((1, 1, 16, 16), 20, dtype=torch.uint8)
    u8[..., 1:4, 1:4] = 140  # a soft-tissue patch in the top-left cell
    moved = torch.full_like(u8, 20)
    moved[..., 4:7, 3:6] = 140  # the same patch elsewhere in the same cell
    other_cell = torch.full_like(u8, 20)
    other_cell[..., 1:4, 10:13] = 140  # in the top-right cell
    h = [enc.backbone.histograms(enc.preprocess(v)) for v in (u8, moved, other_cell)]
    torch.testing.assert_close(h[0], h[1])
    assert not torch.allclose(h[0], h[2])


def test_histogram_branch_feeds_the_slice_feature_and_trains():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_config("tiny_cnn"), image_size=16, slice_hist_bins=8, slice_hist_grid=2,
                              slice_gran_levels=0)  # the histograms alone
    model = create_model(cfg)
    cnn = model.slice_encoder.backbone
    assert cnn.proj.in_features == 64 * 1 * 1 + 2 * 64 + 2 * 2 * 8
    vol = torch.randint(0, 256, (2, 1, 3, 16, 16), dtype=torch.uint8)
    v, t, scale = model(vol, model.tokenize(["a b", "c d"]))
    (scale * v @ t.T).logsumexp(-1).sum().backward()
    hist_columns = cnn.proj.weight.grad[:, -2 * 2 * 8:]
    assert hist_columns.abs().sum() > 0 and cnn.hist_norm.weight.grad.abs().sum() > 0
    without = create_model(dataclasses.replace(cfg, slice_hist_bins=0)).slice_encoder.backbone
    assert without.hist_norm is None and without.proj.in_features == 64 + 2 * 64


def test_histogram_settings_are_checked():
    base = get_model_config("tiny_cnn")
    for bad in ({"slice_hist_bins": -1}, {"slice_hist_grid": 0}, {"slice_hist_bins": 2.5}, {"slice_hist_bins": True}):
        with pytest.raises(ValueError, match="must be an integer"):
            dataclasses.replace(base, **bad)
    with pytest.raises(ValueError, match="slice_hist_bins is a tiny_cnn setting"):
        dataclasses.replace(get_model_config("tiny"), slice_hist_bins=8)
    with pytest.raises(ValueError, match="hist_bins is a tiny_cnn setting"):
        build_slice_encoder("tiny_vit", image_size=28, hist_bins=8)


def test_checkpoints_without_histograms_read_as_none(tmp_path):
    from ctclip.checkpoint import CheckpointError, check_model_config

    now = dataclasses.asdict(dataclasses.replace(get_model_config("tiny_cnn"), slice_hist_bins=32))
    older = {k: v for k, v in now.items() if k not in ("slice_hist_bins", "slice_hist_grid")}
    check_model_config(older, {**now, "slice_hist_bins": 0}, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match="slice_hist_bins: checkpoint 0 vs now 32"):
        check_model_config(older, now, tmp_path / "latest.pt")


def test_window_mediastinal_gives_the_whole_window_and_a_mediastinal_window_with_histograms_of_both():
    """slice_norm window_mediastinal: channel 0 is `window`'s input, channel 1 the W400/L40 window of the same
    HU; the histogram branch counts both channels, each against its own HU range (numpy oracle)."""
    from ctclip.models.slice_encoder import MEDIASTINAL_WINDOW_HU

    lo, hi = MEDIASTINAL_WINDOW_HU
    assert (lo, hi) == (-160.0, 240.0)
    enc = build_slice_encoder("tiny_cnn", image_size=16, slice_norm="window_mediastinal", hist_bins=8, hist_grid=2)
    plain = build_slice_encoder("tiny_cnn", image_size=16, slice_norm="window", hist_bins=8, hist_grid=2)
    assert enc.backbone.features[0].in_channels == 2
    g = np.random.default_rng(3)
    u8 = g.choice([0, 25, 100, 110, 115, 120, 130, 133, 140, 145, 160, 255], size=(4, 16, 16)).astype(np.uint8)
    x = enc.preprocess(torch.from_numpy(u8).unsqueeze(1))
    assert x.shape == (4, 2, 16, 16)
    torch.testing.assert_close(x[:, :1], plain.preprocess(torch.from_numpy(u8).unsqueeze(1)))
    hu = -1000.0 + u8.astype(np.float64) * (2000.0 / 255.0)
    np.testing.assert_allclose((x[:, 1].numpy() + 1) / 2, np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)
    # fat (-100 HU) and a node (+40 HU): 0.14 apart in the whole window, 0.70 in the mediastinal one
    got = enc.backbone.histograms(x).numpy()
    assert got.shape == (4, 2 * 4 * 8)
    want_whole = np.stack([oracle(s, 8, 2) for s in u8])
    np.testing.assert_allclose(got[:, : 4 * 8], want_whole, atol=1e-6)
    for s, h in zip(hu, got[:, 4 * 8:], strict=True):
        cells = [s[r][:, c] for r in (slice(0, 8), slice(8, 16)) for c in (slice(0, 8), slice(8, 16))]
        want = [np.sqrt(np.histogram(np.clip(cell, lo, hi), bins=8, range=(lo, hi))[0] / cell.size) for cell in cells]
        np.testing.assert_allclose(h, np.concatenate(want), atol=1e-6)


def test_window_mediastinal_model_trains_and_other_encoders_refuse_it():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_model_config("tiny_cnn"), image_size=16, slice_norm="window_mediastinal",
                              slice_hist_bins=8, slice_hist_grid=2, slice_gran_levels=1)
    model = create_model(cfg)
    cnn = model.slice_encoder.backbone
    assert cnn.features[0].in_channels == 2 and cnn.hist_norm.num_features == 2 * 2 * 2 * 8
    vol = torch.randint(0, 256, (2, 1, 3, 16, 16), dtype=torch.uint8)
    v, t, scale = model(vol, model.tokenize(["a b", "c d"]))
    (scale * v @ t.T).logsumexp(-1).sum().backward()
    assert cnn.features[0].weight.grad[:, 1].abs().sum() > 0  # the mediastinal channel is learned from
    with pytest.raises(ValueError, match="slice_norm window_mediastinal is a tiny_cnn setting"):
        build_slice_encoder("tiny_vit", image_size=28, slice_norm="window_mediastinal")

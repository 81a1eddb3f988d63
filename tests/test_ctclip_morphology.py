"""ctclip/models/morphology.py: the grey openings against scipy.ndimage on the real chest CT, the residue shares
against a direct computation, what each residue level picks up, and the granulometry branch of tiny_cnn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ctclip.models.morphology import RESIDUE_THRESHOLDS, openings, residue_fractions, to_grey_levels


@pytest.fixture(scope="module")
def chest_slices(samples) -> torch.Tensor:
    """12 axial slices of the real chest CT at the store's 64 x 64, in the encoder's [-1, 1] (-1000..1000 HU)."""
    import nibabel as nib

    hu = np.asarray(nib.load(samples.chest_ct).dataobj, dtype=np.float32)  # (X, Y, Z), HU
    z = np.linspace(0.2, 0.8, 12) * (hu.shape[2] - 1)
    picked = torch.from_numpy(hu[:, :, z.round().astype(int)]).permute(2, 1, 0).unsqueeze(1)
    small = F.interpolate(picked, size=(64, 64), mode="area")[:, 0]
    return (small.clamp(-1000, 1000) / 1000.0).contiguous()


def test_openings_match_scipy_grey_opening_on_the_real_chest_ct(chest_slices):
    v = to_grey_levels(chest_slices)
    assert v.dtype == torch.uint8 and 30 < v.float().mean() < 200  # a real slice, not all air
    for k, opened in zip((3, 5, 7, 9), openings(v, 4)):
        expected = ndi.grey_opening(v.numpy(), size=(1, k, k), mode="nearest")
        np.testing.assert_array_equal(opened.numpy(), expected, err_msg=f"opening by a {k} x {k} square")


def test_residue_fractions_match_a_direct_computation_on_the_real_chest_ct(chest_slices):
    got = residue_fractions(chest_slices, levels=3, grid=2)
    v = to_grey_levels(chest_slices).numpy().astype(np.int32)
    layers = [v] + [ndi.grey_opening(v, size=(1, k, k), mode="nearest") for k in (3, 5, 7)]
    expected = []
    for upper, lower in zip(layers[:-1], layers[1:]):
        residue = (upper - lower).reshape(len(v), 2, 32, 2, 32)
        for t in RESIDUE_THRESHOLDS:
            expected.append((residue > round(t * 127.5)).mean(axis=(2, 4)).reshape(len(v), 4))
    np.testing.assert_allclose(got.numpy(), np.concatenate(expected, axis=1), atol=1e-6)
    assert got.shape == (12, 3 * len(RESIDUE_THRESHOLDS) * 4)
    assert got[:, :16].max() > 0  # the real lungs hold vessels: level 1 is not empty


def test_each_residue_level_holds_structures_of_its_width():
    """A 1-pixel line lands in level 1 (x - open_3), a 4 x 4 blob in level 2 (open_3 - open_5), a 6 x 6 blob in
    level 3; each 900 HU above a -900 HU background (aerated lung), in the cell where it was drawn."""
    x = torch.full((3, 32, 32), -0.9)
    x[0, 4:12, 6] = 0.0  # a vessel-like line, top-left cell
    x[1, 20:24, 20:24] = 0.0  # a nodule of 4 pixels, bottom-right cell
    x[2, 4:10, 20:26] = 0.0  # a nodule of 6 pixels, top-right cell
    f = residue_fractions(x, levels=3, grid=2).view(3, 3, len(RESIDUE_THRESHOLDS), 4)  # (slice, level, thr, cell)
    top = len(RESIDUE_THRESHOLDS) - 1  # 800 HU
    assert f[0, 0, top, 0] == pytest.approx(8 / 256) and f[0, 1:].sum() == 0
    assert f[1, 1, top, 3] == pytest.approx(16 / 256) and f[1, 0].sum() == 0 and f[1, 2].sum() == 0
    assert f[2, 2, top, 1] == pytest.approx(36 / 256) and f[2, :2].sum() == 0


def test_residue_fractions_refuse_a_grid_that_does_not_divide_the_slice():
    with pytest.raises(ValueError, match="does not split into a 3 x 3 grid"):
        residue_fractions(torch.zeros(1, 64, 64), levels=1, grid=3)


def test_the_granulometry_branch_of_tiny_cnn_and_its_settings():
    from ctclip.models.clip3d import CTCLIP
    from ctclip.models.config import ModelConfig
    from ctclip.models.factory import get_model_config
    from ctclip.models.tiny_cnn import TinySliceCNN

    torch.manual_seed(0)
    with_gran = TinySliceCNN(image_size=32, hist_bins=8, gran_levels=3)
    without = TinySliceCNN(image_size=32, hist_bins=8)
    assert with_gran.proj.in_features - without.proj.in_features == 3 * len(RESIDUE_THRESHOLDS) * 4
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    out = with_gran(x)
    assert out.shape == (6, 128)
    (out * torch.randn_like(out)).sum().backward()  # (a plain sum of a layer norm's output has no gradient)
    assert with_gran.features[0].weight.grad.abs().sum() > 0  # the convolutions still learn beside it
    cfg = get_model_config("tiny_cnn", slice_gran_levels=3, image_size=32)
    vol = torch.randint(0, 256, (2, 1, 4, 32, 32), dtype=torch.uint8)
    assert CTCLIP(cfg).encode_volume(vol).shape == (2, cfg.embed_dim)
    with pytest.raises(ValueError, match="slice_gran_levels is a tiny_cnn setting"):
        ModelConfig(slice_encoder="tiny", slice_gran_levels=3)
    with pytest.raises(ValueError, match="slice_gran_levels needs image_size"):
        ModelConfig(slice_encoder="tiny_cnn", image_size=66, slice_hist_grid=4, slice_gran_levels=3)
    with pytest.raises(ValueError, match="slice_gran_levels must be an integer >= 0"):
        ModelConfig(slice_encoder="tiny_cnn", slice_gran_levels=-1)


def test_checkpoints_without_granulometry_read_as_none(tmp_path):
    import dataclasses

    from ctclip.checkpoint import CheckpointError, check_model_config
    from ctclip.models.factory import get_model_config

    now = dataclasses.asdict(get_model_config("tiny_cnn", slice_gran_levels=3))
    older = {k: v for k, v in now.items() if k != "slice_gran_levels"}
    check_model_config(older, {**now, "slice_gran_levels": 0}, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match="slice_gran_levels: checkpoint 0 vs now 3"):
        check_model_config(older, now, tmp_path / "latest.pt")

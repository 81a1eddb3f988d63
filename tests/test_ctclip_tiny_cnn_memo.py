"""tiny_cnn's memo of fixed features (ctclip/models/tiny_cnn.py: FixedFeatureMemo): in training, a slice's histogram
and granulometry features are kept after their first computation and reused when the slice comes back. The oracle
is the same encoder with the memo switched off (`fixed_memo = None`): the features, the BatchNorm statistics and
the gradients must be the same bits."""

from __future__ import annotations

import copy

import pytest
import torch

from ctclip.models.slice_encoder import build_slice_encoder
from ctclip.models.tiny_cnn import FixedFeatureMemo, slice_digests


def _encoders(**kw):
    torch.manual_seed(0)
    enc = build_slice_encoder("tiny_cnn", image_size=32, slice_norm="window_mediastinal", hist_bins=8,
                              gran_levels=2, chunk=16, **kw)
    plain = copy.deepcopy(enc)
    plain.backbone.fixed_memo = None
    return enc, plain


def _volumes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 256, (n, 1, 6, 32, 32), generator=g, dtype=torch.uint8)
    v[:, :, -2:] = 0  # padding slices: the same bytes many times over, within a chunk and across volumes
    return v


def test_memo_gives_the_same_features_and_gradients_as_computing_every_time():
    enc, plain = _encoders()
    vols = _volumes(8, 1)
    for batch in (vols[:4], vols[2:8], vols[:4], vols[[7, 0, 5]]):  # new, partly seen, all seen, reordered
        a, b = enc(batch), plain(batch)
        assert torch.equal(a, b)
        a.square().mean().backward()
        b.square().mean().backward()
        for (name, p), q in zip(enc.named_parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad), name
        enc.zero_grad()
        plain.zero_grad()
    for x, y in zip(enc.backbone.buffers(), plain.backbone.buffers()):  # BatchNorm running statistics
        assert torch.equal(x, y)
    # one row per distinct slice: 8 volumes x 4 random slices, and the zero slice once
    assert len(enc.backbone.fixed_memo) == 8 * 4 + 1


def test_memo_is_used_only_in_training():
    enc, _ = _encoders()
    enc.eval()
    with torch.no_grad():
        enc(_volumes(3, 2))
    assert len(enc.backbone.fixed_memo) == 0
    enc.train()
    enc(_volumes(3, 2))
    assert len(enc.backbone.fixed_memo) == 3 * 4 + 1


def test_memo_stops_growing_at_its_cap_and_stays_exact():
    memo = FixedFeatureMemo(width=3, max_slices=5)
    x = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2)
    calls = []

    def compute(rows: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return torch.stack([rows[:, 0], rows[:, 1], rows.sum(1)], dim=1)

    keys = [bytes([i]) for i in range(8)]
    want = compute(x)
    calls.clear()
    assert torch.equal(memo.features(keys, compute, x), want)
    assert len(memo) == 5 and calls == [8]
    assert torch.equal(memo.features(keys, compute, x), want)  # the first five kept, the last three computed
    assert calls == [8, 3]


def test_slice_digests_tell_slices_apart_by_content():
    v = _volumes(2, 3).reshape(-1, 1, 32, 32)
    keys = slice_digests(v)
    assert len(keys) == len(v) and all(len(k) == 16 for k in keys)
    assert keys[4] == keys[5] == keys[10]  # padding
    assert len(set(keys)) == 2 * 4 + 1
    with pytest.raises(ValueError, match="3 slice keys for 12 slices"):
        _encoders()[0].backbone(torch.zeros(12, 2, 32, 32), slice_keys=keys[:3])

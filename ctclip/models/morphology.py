"""Grey-level granulometry of CT slices: how much bright structure of each size a slice region holds.

The opening of an image by a k x k square (erosion, then dilation, both by the square) removes every bright
structure narrower than k pixels and keeps the rest. The difference between two openings, `open_k - open_k'`
with k < k', is the bright detail whose width lies between k and k' pixels (a pattern spectrum: Matheron's
granulometry). On a chest CT slice of 64 pixels (~6 mm each), `x - open_3` holds vessels, septal lines and
calcified specks, `open_3 - open_5` nodules and small nodes of 3-4 pixels, `open_5 - open_7` those of 5-6
pixels. A pixel's residue is how much brighter it is than what the larger square leaves there: a solid nodule
in aerated lung is ~900 HU above it.

`residue_fractions` turns that into fixed per-slice features: for each residue level and each cell of a
`grid` x `grid` split of the slice, the share of pixels whose residue is above each threshold. Everything runs
on uint8 (the store's 256 grey levels) with 3-wide min/max passes (a 5 x 5 square is two 3 x 3 squares, a 7 x
7 three); the edges are replicated, which gives the same result as a max filter that ignores the outside
(tests/test_ctclip_morphology.py checks it against scipy.ndimage.grey_opening). Three levels add ~0.06 CPU-s
to a tiny_cnn training step over 1024 slices of 64 x 64 on one thread (`benchmarks/bench_tiny_cnn.py
--hist_bins 32 --gran_levels 3` against `--hist_bins 32`).
"""

from __future__ import annotations

import torch

# residue thresholds as fractions of the input's full range [-1, 1] (2.0): with slice_norm "window" (the
# store's -1000..1000 HU) 100, 200, 400 and 800 HU
RESIDUE_THRESHOLDS = (0.1, 0.2, 0.4, 0.8)


def _pass3(v: torch.Tensor, dim: int, op) -> torch.Tensor:
    """3-wide running min or max (`op` torch.minimum / torch.maximum) along `dim`; the edges see themselves."""
    n = v.shape[dim]
    if n < 2:
        return v.clone()
    pair = op(v.narrow(dim, 0, n - 1), v.narrow(dim, 1, n - 1))  # pair[i] = op(v[i], v[i + 1])
    out = v.clone()
    out.narrow(dim, 0, n - 1).copy_(pair)
    tail = out.narrow(dim, 1, n - 1)
    tail.copy_(op(tail, pair))  # out[i] = op(v[i - 1], v[i], v[i + 1])
    return out


def _square3(v: torch.Tensor, op, times: int = 1) -> torch.Tensor:
    """`times` passes of a 3 x 3 square min/max over the last two dims (= one (2 * times + 1) square)."""
    for _ in range(times):
        v = _pass3(_pass3(v, -1, op), -2, op)
    return v


def openings(v: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """(..., H, W) -> the openings by squares of 3, 5, ..., 2 * levels + 1 pixels (each the same shape)."""
    out, eroded = [], v
    for k in range(1, levels + 1):
        eroded = _square3(eroded, torch.minimum)
        out.append(_square3(eroded, torch.maximum, times=k))
    return out


def to_grey_levels(x: torch.Tensor) -> torch.Tensor:
    """Encoder input in [-1, 1] -> uint8 0..255 (the store's grey levels: exact for slice_norm "window")."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def residue_fractions(x: torch.Tensor, levels: int, grid: int) -> torch.Tensor:
    """(N, H, W) input in [-1, 1] -> (N, levels * len(RESIDUE_THRESHOLDS) * grid * grid): for each residue level
    (x - open_3, open_3 - open_5, ...), each threshold and each cell of a grid x grid split (H and W divisible
    by `grid`), the share of the cell's pixels whose residue is above the threshold."""
    n, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"residue_fractions: a {h} x {w} slice does not split into a {grid} x {grid} grid")
    v = to_grey_levels(x)
    layers = [v, *openings(v, levels)]
    feats = []
    for upper, lower in zip(layers[:-1], layers[1:]):
        # uint8 without wrap-around: an opening never exceeds what it opens, nor a larger one a smaller one
        cells = (upper - lower).view(n, grid, h // grid, grid, w // grid)
        for threshold in RESIDUE_THRESHOLDS:
            feats.append((cells > round(threshold * 127.5)).sum(dim=(2, 4), dtype=torch.int32).flatten(1))
    return torch.cat(feats, dim=1).to(torch.float32) / ((h // grid) * (w // grid))

"""`tiny_cnn`: a small convolutional slice encoder that learns from scratch on a CPU.

A stack of 3x3 convolutions with stride 2 (each halves the slice), then the last feature map is
flattened, so the slice feature keeps WHERE something is (a large heart, fluid at the back of the
chest), and projected to `out_dim`. One input channel: CT slices are grey, and the three identical
channels a pretrained RGB backbone wants would only triple the first layer's work.

Why not the tiny ViT: from random initialisation a 2-block ViT over 16 patches of 14x14 learned
nothing in 15 CPU-minutes of a supervised probe on the synthetic set (AUROC 0.51-0.52), while a
per-slice average pool + linear layer found the easy findings; the convolutions' locality bias is
what a small model without pretraining needs (docs/benchmarks.md, "what was wrong").

BatchNorm after each convolution: without it the network learned nothing in 3 CPU-minutes of the
supervised probe (test AUROC 0.51: the features of all volumes were nearly the same vector and the
gradient reaching the first layer fell to ~1e-5); with it the probe found cardiomegaly (1.00), septal
thickening and bronchiectasis. BatchNorm normalises each channel over the slices of a chunk (several
volumes), not each slice on its own, so a slice's absolute density still reaches the model (per-slice
GroupNorm/LayerNorm would remove it). The slice feature is the flattened last map (where) plus the
map's global max and mean per channel (what, wherever it is), projected and layer-normalised.

Intensity histograms (`hist_bins` > 0): beside the convolutions, the fraction of each cell of a
`hist_grid` x `hist_grid` split of the slice that falls in each of `hist_bins` equal intensity bins of the
input range ([-1, 1]: the store's -1000..1000 HU with `slice_norm: window`), square-rooted and batch-
normalised. Fixed counts, no weights: how much of the left lung is below -940 HU, how much of the
mediastinum is fluid or calcium. CT intensities are calibrated, and these first-order statistics are what
several findings are about (mosaic attenuation, calcified plaques, fluid); strided convolutions from random
initialisation found them slowly. Supervised probe, 3 CPU-minutes, same hour: 0.747 without, 0.828 with 32
bins on a 2 x 2 grid (mosaic attenuation 0.58 -> 1.00, coronary calcification 0.63 -> 0.86;
docs/benchmarks.md). The counts carry no gradient to the input (nothing upstream of them learns).

Granulometry (`gran_levels` > 0): beside the histograms, how much bright structure of each size each cell holds
(`ctclip/models/morphology.py`): the share of pixels that the opening by a 3 x 3 square removes by more than
100, 200, 400 or 800 HU, then the same between the 3 x 3 and 5 x 5 openings, and so on: vessels and calcified
specks, nodules and nodes of 3-4 pixels, of 5-6 pixels. Fixed, no weights, square-rooted and batch-normalised
like the histograms. Small focal findings are what strided convolutions from random initialisation found
last or never (supervised probe: nodules 0.61 with histograms alone); a linear model on the octants'
histograms and these shares read nodules at 0.73 and lymph nodes at 0.74, against 0.51 and 0.65 on the
histograms alone (docs/benchmarks.md).

The fixed branches are functions of the slice alone, so in training each slice's raw histogram and granulometry
features are kept after their first computation (`FixedFeatureMemo`, keyed by a digest of the stored uint8 slice
that `SliceEncoder` passes in as `slice_keys`) and looked up when the slice comes back in a later epoch: the same
numbers, ~0.14 CPU-s less per learning-benchmark step than recomputing them, the digests included
(`benchmarks/bench_tiny_cnn.py --memo`: 0.445 against 0.587 CPU-s for the encoder's step). Evaluation (eval mode) computes them as before and keeps nothing.

Channels-last memory layout (weights and activations): on a CPU the same convolutions take less time in
it (a training step over 1024 slices of 64 x 64 in chunks of 64, one thread: 0.31 instead of 0.39 CPU-s,
`benchmarks/bench_tiny_cnn.py`), and on a GPU it is the layout AMP's kernels want. `channels_last=False`
builds the same network in the default layout (the benchmark's reference).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from ctclip.models.morphology import RESIDUE_THRESHOLDS, residue_fractions

MEMO_MAX_SLICES = 1 << 18  # ~260k slices (~300 MB of float32 features with tiny_cnn.yaml's branches); then no more


def slice_digests(slices: torch.Tensor) -> list[bytes]:
    """(N, ...) slices (uint8, on the CPU) -> one 16-byte blake2b digest of each slice's bytes: the memo's keys."""
    rows = slices.detach().contiguous().reshape(slices.shape[0], -1).numpy()
    return [hashlib.blake2b(row, digest_size=16).digest() for row in rows]


class FixedFeatureMemo:
    """Rows of fixed features by slice digest, at most `max_slices` of them (the first ones seen stay)."""

    def __init__(self, width: int, max_slices: int = MEMO_MAX_SLICES):
        self.width, self.max_slices = int(width), int(max_slices)
        self.rows: dict[bytes, int] = {}
        self.table = torch.empty(0, self.width)

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, keys: Sequence[bytes], compute, x: torch.Tensor) -> torch.Tensor:
        """(N, width): the kept rows of `keys`, and `compute(x[missing])` for the others (kept while there is room)."""
        found = [self.rows.get(k, -1) for k in keys]
        missing = [i for i, r in enumerate(found) if r < 0]
        if not missing:
            return self.table[found]
        hit = [i for i, r in enumerate(found) if r >= 0]
        out = torch.empty(len(keys), self.width)
        out[hit] = self.table[[found[i] for i in hit]]
        fresh = compute(x[missing]).detach().to(torch.float32)
        out[missing] = fresh
        self._keep([keys[i] for i in missing], fresh)
        return out

    def _keep(self, keys: list[bytes], rows: torch.Tensor) -> None:
        """Append the rows of keys not kept yet (one row per key: a slice twice in a chunk), up to the cap."""
        first: dict[bytes, int] = {}
        for j, k in enumerate(keys):
            first.setdefault(k, j)
        new = list(first.items())[: self.max_slices - len(self.rows)]
        if not new:
            return
        start, end = len(self.rows), len(self.rows) + len(new)
        if end > self.table.shape[0]:  # grow by doubling, up to the cap
            grown = torch.empty(min(max(2 * self.table.shape[0], end, 1024), self.max_slices), self.width)
            grown[:start] = self.table[:start]
            self.table = grown
        self.table[start:end] = rows[[j for _, j in new]]
        self.rows.update({k: start + n for n, (k, _) in enumerate(new)})


class TinySliceCNN(nn.Module):
    """(N, in_chans, S, S) -> (N, out_dim); `num_features` = out_dim (timm's attribute name)."""

    def __init__(self, image_size: int = 64, widths: tuple[int, ...] = (16, 32, 64, 64), out_dim: int = 128,
                 in_chans: int = 1, channels_last: bool = True, hist_bins: int = 0, hist_grid: int = 2,
                 gran_levels: int = 0, hist_channels: int = 1):
        super().__init__()
        if hist_bins < 0 or hist_grid < 1 or gran_levels < 0:
            raise ValueError(f"TinySliceCNN: hist_bins and gran_levels must be >= 0 and hist_grid >= 1, got "
                             f"{hist_bins}, {gran_levels}, {hist_grid}")
        if not 1 <= hist_channels <= in_chans:
            raise ValueError(f"TinySliceCNN: hist_channels must be in 1..in_chans ({in_chans}), got {hist_channels}")
        if gran_levels and image_size % hist_grid:
            raise ValueError(f"TinySliceCNN: granulometry needs image_size ({image_size}) divisible by hist_grid "
                             f"({hist_grid})")
        self.hist_bins, self.hist_grid, self.gran_levels = hist_bins, hist_grid, gran_levels
        self.hist_channels = hist_channels
        n_hist = hist_bins * hist_grid * hist_grid * hist_channels
        self.hist_norm = nn.BatchNorm1d(n_hist) if n_hist else None
        n_gran = gran_levels * len(RESIDUE_THRESHOLDS) * hist_grid * hist_grid
        self.gran_norm = nn.BatchNorm1d(n_gran) if n_gran else None
        side = image_size
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            c, side = w, math.ceil(side / 2)
        self.features = nn.Sequential(*layers)
        # the flattened last map (where), and its global max and mean per channel (what, wherever it is:
        # a calcified plaque or a nodule lands anywhere, and a position-wise weight would have to learn
        # each place separately)
        self.proj = nn.Linear(c * side * side + 2 * c + n_hist + n_gran, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.num_features = out_dim
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.proj.in_features))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.features.to(memory_format=self.memory_format)
        self.n_hist = n_hist
        self.fixed_memo = FixedFeatureMemo(n_hist + n_gran) if n_hist + n_gran else None

    def histograms(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) input in [-1, 1] -> (N, hist_channels * grid * grid * bins): the fraction of each
        region's pixels in each intensity bin of each of the first `hist_channels` channels, square-rooted.
        Regions: a grid x grid split of the slice."""
        if self.hist_channels > 1:  # the channels as more slices: (N, C, S, S) -> (N * C, 1, S, S)
            n = x.shape[0]
            one = x[:, : self.hist_channels].reshape(n * self.hist_channels, 1, *x.shape[2:])
            return self._histograms(one).reshape(n, -1)
        return self._histograms(x)

    def _histograms(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0]
        n, h, w = v.shape
        bins, g = self.hist_bins, self.hist_grid
        b = ((v.detach().float().clamp(-1.0, 1.0) + 1.0) * (bins / 2)).long().clamp_(max=bins - 1)
        rows = torch.arange(h, device=v.device) * g // h
        cols = torch.arange(w, device=v.device) * g // w
        region = (rows.view(-1, 1) * g + cols.view(1, -1)) * bins  # (H, W): first bin of the pixel's region
        counts = torch.zeros(n, g * g * bins, device=v.device)
        counts.scatter_add_(1, (region + b).flatten(1), torch.ones(n, h * w, device=v.device))
        per_region = torch.bincount(region.flatten() // bins, minlength=g * g).repeat_interleave(bins)
        return (counts / per_region.clamp(min=1)).sqrt()

    def fixed_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_hist + n_gran): the histograms and granulometry shares of each slice, before their BatchNorms."""
        parts = []
        if self.hist_norm is not None:
            parts.append(self.histograms(x))
        if self.gran_norm is not None:
            parts.append(residue_fractions(x[:, 0], self.gran_levels, self.hist_grid).sqrt())
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, slice_keys: Sequence[bytes] | None = None) -> torch.Tensor:
        """`slice_keys` (one digest per slice of `x`, `slice_digests`): in training on the CPU, the fixed features
        of slices seen before come from the memo (`fixed_memo`; None: none kept)."""
        f = self.features(x.contiguous(memory_format=self.memory_format))
        parts = [f.flatten(1), f.amax(dim=(2, 3)), f.mean(dim=(2, 3))]
        if self.hist_norm is not None or self.gran_norm is not None:
            if self.fixed_memo is not None and slice_keys is not None and self.training and x.device.type == "cpu":
                if len(slice_keys) != x.shape[0]:
                    raise ValueError(f"TinySliceCNN: {len(slice_keys)} slice keys for {x.shape[0]} slices")
                fixed = self.fixed_memo.features(slice_keys, self.fixed_features, x)
            else:
                fixed = self.fixed_features(x)
            if self.hist_norm is not None:
                parts.append(self.hist_norm(fixed[:, : self.n_hist]))
            if self.gran_norm is not None:
                parts.append(self.gran_norm(fixed[:, self.n_hist:]))
        return self.norm(self.proj(torch.cat(parts, dim=1)))

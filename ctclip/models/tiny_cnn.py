"""`tiny_cnn`: a small convolutional slice encoder that learns from scratch on a CPU.

A stack of 3x3 convolutions with stride 2 (each halves the slice), then the last feature map is
flattened, so the slice feature keeps WHERE something is (a large heart, fluid at the back of the
chest), and projected to `out_dim`. One input channel: CT slices are grey, and the three identical
channels a pretrained RGB backbone wants would only triple the first layer's work.

Why not the tiny ViT: from random initialisation a 2-block ViT over 16 patches of 14x14 learned
nothing in 15 CPU-minutes of a supervised probe on the synthetic set (AUROC 0.51-0.52), while a
per-slice average pool + linear layer found the easy findings; the convolutions' locality bias is
what a small model without pretraining needs (docs/benchmarks.md, "what was wrong").

No normalisation layers: BatchNorm over the chunks the slice encoder feeds (a few slices of one
volume) would normalise each volume by its own statistics, and per-slice GroupNorm/LayerNorm would
remove the absolute density that effusion, consolidation and calcium are about. A LayerNorm on the
output feature keeps the fusion's input at a stable scale instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TinySliceCNN(nn.Module):
    """(N, in_chans, S, S) -> (N, out_dim); `num_features` = out_dim (timm's attribute name)."""

    def __init__(self, image_size: int = 64, widths: tuple[int, ...] = (16, 32, 64, 64), out_dim: int = 128,
                 in_chans: int = 1):
        super().__init__()
        side = image_size
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, kernel_size=3, stride=2, padding=1), nn.GELU()]
            c, side = w, math.ceil(side / 2)
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c * side * side, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.num_features = out_dim
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.proj.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.features(x).flatten(1)))

"""Slice fusion: per-slice features (B, D, C) -> one volume embedding (B, embed_dim).

A learned CLS token is prepended to the D projected slice tokens and an x-transformers `Encoder`
(rotary position embedding, so any D works without a position table; flash attention through
PyTorch's scaled_dot_product_attention) mixes them; the CLS output goes through LayerNorm and a
linear projection.
"""

from __future__ import annotations

import torch
from torch import nn
from x_transformers import Encoder


class SliceFusion(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, out_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion dim {dim} is not divisible by {heads} heads")
        dim_head = dim // heads
        self.proj_in = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.encoder = Encoder(
            dim=dim,
            depth=depth,
            heads=heads,
            attn_dim_head=dim_head,
            attn_flash=True,
            rotary_pos_emb=True,
            # rotate at least 32 features of each head (x-transformers' advice), at most all of them
            rotary_emb_dim=min(dim_head, max(32, dim_head // 2)),
            pre_norm_has_final_norm=False,  # the final norm is self.norm, applied to the CLS token only
        )
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def tokens(self, slice_feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, in_dim) -> the encoder's outputs (B, 1 + D, dim): the CLS token first, then the slices."""
        x = self.proj_in(slice_feats)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        if mask is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask.bool()], dim=1)
        return self.encoder(x, mask=mask)

    def head(self, token: torch.Tensor) -> torch.Tensor:
        """A pooled (B, dim) token -> (B, out_dim)."""
        return self.proj_out(self.norm(token))

    def forward(self, slice_feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, in_dim) -> (B, out_dim), not normalised. `mask` (B, D) bool: True = real slice."""
        return self.head(self.tokens(slice_feats, mask)[:, 0])

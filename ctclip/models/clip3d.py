"""CT-CLIP: slice encoder -> slice fusion -> volume embedding, contrasted with a CLIP text tower.

    model = create_model("dinov2_vitb14")        # ctclip.models.factory
    tokens = model.tokenize(["No acute findings.", "Bilateral pleural effusion."])
    vol, txt, scale = model(volumes_uint8, tokens.to(device))   # logits = scale * vol @ txt.T

`encode_slices` and `encode_volume_from_slices` are split so that frozen-backbone runs can cache
slice features (keyed by `slice_encoder_id()`) and train only the fusion and text parts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ctclip.models.config import ModelConfig
from ctclip.models.fusion import SliceFusion
from ctclip.models.slice_encoder import build_slice_encoder
from ctclip.models.text import (
    Sentences,
    build_text_tower,
    encode_sentences,
    encode_tokens,
    load_openai_text_weights,
    tokenize,
)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the learned inverse temperature
# parameters that are positions/tokens rather than weights: no weight decay
NO_DECAY_NAMES = ("cls_token", "pos_embed", "reg_token", "register_tokens", "positional_embedding", "logit_scale")


class BatchCenter(nn.BatchNorm1d):
    """Centre and scale each embedding dimension on the batch (running statistics at eval, and for a
    one-row batch in training, where batch statistics do not exist)."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)

    def like(self, reference: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`x` centred and scaled with the statistics `forward(reference)` uses (the batch's in training, the
        running ones at eval), without updating the running statistics."""
        if self.training and reference.shape[0] >= 2:
            mean, var = reference.mean(dim=0), reference.var(dim=0, unbiased=False)
            return (x - mean) / torch.sqrt(var + self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)


class CTCLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.slice_encoder = build_slice_encoder(
            cfg.slice_encoder,
            image_size=cfg.image_size,
            weights=cfg.dinov2_weights,
            source=cfg.dinov2_source,
            freeze=cfg.freeze_dinov2,
            chunk=cfg.slice_chunk,
            grad_checkpointing=cfg.grad_checkpointing,
            slice_norm=cfg.slice_norm,
            hist_bins=cfg.slice_hist_bins,
            hist_grid=cfg.slice_hist_grid,
            gran_levels=cfg.slice_gran_levels,
        )
        self.fusion = SliceFusion(self.slice_encoder.width, cfg.fusion_dim, cfg.fusion_depth, cfg.fusion_heads,
                                  cfg.embed_dim, pool=cfg.fusion_pool)
        self.text = build_text_tower(cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads,
                                     cfg.embed_dim)
        if cfg.text_weights:
            load_openai_text_weights(self.text, cfg.text_weights)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        # optional centring of both embeddings on the batch (cfg.embed_center); identity otherwise
        self.volume_center = BatchCenter(cfg.embed_dim) if cfg.embed_center else nn.Identity()
        self.text_center = BatchCenter(cfg.embed_dim) if cfg.embed_center else nn.Identity()

    def tokenize(self, texts: list[str]) -> torch.LongTensor:
        """(B, context_length) CLIP BPE ids on the CPU; longer texts are truncated."""
        return tokenize(texts, self.cfg.context_length)

    def encode_slices(self, volumes: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, D, H, W) -> per-slice features (B, D, C), C = slice encoder width."""
        return self.slice_encoder(volumes)

    def encode_volume_from_slices(self, slice_feats: torch.Tensor, mask: torch.Tensor | None = None,
                                  positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, C) -> (B, embed_dim), L2-normalised. `mask` (B, D): True for real (unpadded) slices;
        `positions` (D,): the slices' indices in their volume when they are a subset of it (`SliceFusion.tokens`)."""
        return F.normalize(self.volume_center(self.fusion(slice_feats, mask=mask, positions=positions)), dim=-1)

    def encode_volume(self, volumes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_volume_from_slices(self.encode_slices(volumes), positions=positions)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) ids -> (B, embed_dim), L2-normalised."""
        pooled = encode_tokens(self.text, tokens, self.cfg.text_pool, self.cfg.text_causal)
        return F.normalize(self.text_center(pooled), dim=-1)

    def encode_text_sentences(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Sentences]:
        """`encode_text`, and each sentence's embedding (L2-normalised, centred with the reports' statistics, as a
        one-sentence prompt is at evaluation): the sentence-image term of training. Text pool "sentence" only."""
        if self.cfg.text_pool != "sentence":
            raise ValueError(f"sentence embeddings need text_pool 'sentence', the model has {self.cfg.text_pool!r}")
        pooled, sentences = encode_sentences(self.text, tokens)
        if isinstance(self.text_center, BatchCenter):
            sentences.features = self.text_center.like(pooled, sentences.features)
        sentences.features = F.normalize(sentences.features, dim=-1)
        return F.normalize(self.text_center(pooled), dim=-1), sentences

    def forward(self, volumes: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(volume features, text features, logit scale = exp(clamped logit_scale))."""
        return self.encode_volume(volumes), self.encode_text(tokens), self.temperature_scale()

    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def slice_encoder_id(self) -> str:
        """Backbone name, input size, slice normalisation (when not the default min-max, so that keys of
        existing caches stay valid) and sha256 of its weights: the key of a slice feature cache."""
        enc = self.slice_encoder
        norm = "" if enc.slice_norm == "minmax" else f":norm={enc.slice_norm}"
        return f"{enc.name}@{enc.image_size}px{norm}:sha256={enc.weights_sha256()}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over trainable parameters: decayed weights, and the rest (norms, biases, gains,
    temperature, CLS/position/register tokens) without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

"""Model settings (`ModelConfig`, validated on construction) and `model_config_from_yaml`, the YAML file loader.

Architectures by name (`ctclip/models/configs/<name>.yaml`) are `ctclip.models.factory`'s: `get_model_config`,
`create_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from ctclip.models.fusion import FUSION_POOLS
from ctclip.models.slice_encoder import SLICE_NORMS
from ctclip.models.text import TEXT_POOLS

DINOV2_SOURCES = ("file", "hub")


@dataclass
class ModelConfig:
    # dinov2_vit{s,b,l,g}14[_reg] | "timm:<timm model>" | "openclip:<RN50|ViT-B-32|...>" | "tiny_vit" (tests) |
    # "tiny_cnn" (from scratch on a CPU: demo, learning benchmark)
    slice_encoder: str = "dinov2_vitb14"
    # Local official DINOv2 .pth (e.g. dinov2_vitb14_pretrain.pth). For "timm:" encoders a file timm's
    # loader takes; for "openclip:" a full CLIP checkpoint (state dict or OpenAI TorchScript archive).
    # None: random init (with a warning).
    dinov2_weights: str | None = None
    dinov2_source: str = "file"  # "file" | "hub" (torch.hub.load('facebookresearch/dinov2', ...), needs network)
    freeze_dinov2: bool = False  # freezes whichever slice encoder is configured
    slice_chunk: int = 64  # slices per backbone forward: bounds memory when frozen or with grad_checkpointing
    grad_checkpointing: bool = False  # recompute each chunk in backward
    image_size: int = 224  # slices are resized to this on the device
    # slice intensities: "minmax" per slice (pretrained RGB backbones) | "window" (the store's HU window kept)
    slice_norm: str = "minmax"
    # tiny_cnn only: a per-slice intensity histogram beside the convolutions (0: none), `slice_hist_bins` bins
    # over the encoder's input range in each cell of a `slice_hist_grid` x `slice_hist_grid` split of the
    # slice (ctclip/models/tiny_cnn.py): how much of each region is air, fat, fluid, soft tissue, calcium
    slice_hist_bins: int = 0
    slice_hist_grid: int = 2
    # tiny_cnn only: granulometry beside the histograms (0: none): for the residues of `slice_gran_levels`
    # openings (3 x 3, 5 x 5, ... squares) in each cell of the same grid, the share of pixels above 100, 200,
    # 400 and 800 HU (ctclip/models/morphology.py): how much bright structure of each size (nodules, nodes)
    slice_gran_levels: int = 0
    fusion_dim: int = 512
    fusion_depth: int = 4
    fusion_heads: int = 8
    # the volume token: "cls" (the seed's, CT-CLIP's) or "max" over the fused slice tokens (a focal finding
    # on a few slices passes through; what the from-scratch CPU model uses, ctclip/models/fusion.py)
    fusion_pool: str = "cls"
    embed_dim: int = 512  # joint embedding
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_weights: str | None = None  # local OpenAI CLIP weights (state dict or TorchScript archive)
    init_temperature: float = 0.07
    # how the text tower pools its tokens: "eot" (CLIP: the end-of-text token; keep it with OpenAI weights)
    # or "mean" (the mean over the text's tokens: a tower trained from scratch starts from a bag of words,
    # whose random features already follow the report's content, not its length) or "sentence" (each
    # sentence encoded on its own, with positions counted from its start, and the text the mean of its
    # sentences: a one-sentence prompt is embedded exactly as the same sentence inside a report; needs
    # text_causal false)
    text_pool: str = "eot"
    # causal attention in the text tower (CLIP's; keep it with OpenAI weights). False, with text_pool mean:
    # every token sees the whole text, so a finding's own tokens see a negation after them
    text_causal: bool = True
    # centre each embedding on the batch (BatchNorm1d without affine, running statistics at eval) before
    # the L2 norm: towers trained from scratch start with every volume (and every report) embedded in
    # nearly the same direction (cosine ~0.95), which leaves the contrastive loss almost no gradient
    embed_center: bool = False

    def __post_init__(self) -> None:
        positive = ("slice_chunk", "image_size", "fusion_dim", "fusion_depth", "fusion_heads", "embed_dim",
                    "context_length", "text_width", "text_layers", "text_heads")
        bad = [f"{n}={getattr(self, n)!r}" for n in positive
               if not isinstance(getattr(self, n), int) or isinstance(getattr(self, n), bool)
               or getattr(self, n) <= 0]
        if bad:
            raise ValueError(f"ModelConfig: these must be positive integers: {', '.join(bad)}")
        for name, low in (("slice_hist_bins", 0), ("slice_hist_grid", 1), ("slice_gran_levels", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ModelConfig: {name} must be an integer >= {low}, got {value!r}")
        for name in ("slice_hist_bins", "slice_gran_levels"):
            if getattr(self, name) and self.slice_encoder != "tiny_cnn":
                raise ValueError(f"ModelConfig: {name} is a tiny_cnn setting, not one of {self.slice_encoder!r}")
        if self.slice_gran_levels and self.image_size % self.slice_hist_grid:
            raise ValueError(f"ModelConfig: slice_gran_levels needs image_size ({self.image_size}) divisible by "
                             f"slice_hist_grid ({self.slice_hist_grid})")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"ModelConfig: text_pool must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if not isinstance(self.text_causal, bool):
            raise ValueError(f"ModelConfig: text_causal must be true or false, got {self.text_causal!r}")
        if not self.text_causal and self.text_pool == "eot":
            raise ValueError("ModelConfig: text_causal false needs text_pool mean or sentence")
        if self.text_causal and self.text_pool == "sentence":
            raise ValueError("ModelConfig: text_pool sentence needs text_causal false")
        if not isinstance(self.embed_center, bool):
            raise ValueError(f"ModelConfig: embed_center must be true or false, got {self.embed_center!r}")
        if self.fusion_pool not in FUSION_POOLS:
            raise ValueError(f"ModelConfig: fusion_pool must be one of {FUSION_POOLS}, got {self.fusion_pool!r}")
        if self.slice_norm not in SLICE_NORMS:
            raise ValueError(f"ModelConfig: slice_norm must be one of {SLICE_NORMS}, got {self.slice_norm!r}")
        if self.dinov2_source not in DINOV2_SOURCES:
            raise ValueError(f"ModelConfig: dinov2_source must be one of {DINOV2_SOURCES}, got {self.dinov2_source!r}")
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(f"ModelConfig: fusion_dim {self.fusion_dim} is not divisible by fusion_heads "
                             f"{self.fusion_heads}")
        if self.text_width % self.text_heads:
            raise ValueError(f"ModelConfig: text_width {self.text_width} is not divisible by text_heads "
                             f"{self.text_heads}")
        if not (isinstance(self.init_temperature, (int, float)) and 0 < self.init_temperature
                and math.isfinite(self.init_temperature)):
            raise ValueError(f"ModelConfig: init_temperature must be a positive number, got {self.init_temperature!r}")
        for name in ("dinov2_weights", "text_weights"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))


def model_config_from_yaml(path: str | Path) -> ModelConfig:
    """Read a model YAML file (e.g. `ctclip/models/configs/<name>.yaml`); keys not in `ModelConfig` raise ValueError."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of ModelConfig fields, got {type(data).__name__}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model setting(s) {unknown}; known: {', '.join(sorted(known))}")
    return ModelConfig(**data)

"""2D slice encoders for CT volumes: DINOv2 (timm), any timm model, open_clip visual towers, tiny_vit.

`SliceEncoder` takes uint8 volumes (B, 1, D, H, W) and returns per-slice features (B, D, C). All slice
preprocessing runs on the model's device: intensities to [0, 1] (`slice_norm`), bilinear resize, the
backbone's channels (3 for RGB backbones; for `tiny_cnn` 1, or one per display window) and its own mean/std.

`slice_norm`: "minmax" stretches each slice to [0, 1] (what an RGB backbone pretrained on photographs
expects; the default for DINOv2), "window" keeps the store's HU window (uint8 / 255: 0 = -1000 HU,
255 = +1000 HU by default), so that a slice's absolute density (fluid, consolidation, calcium) reaches
the model. Min-max makes the same tissue a different grey in every slice: the brightest voxel (bone or
calcium) sets the scale. "ct_windows" and "window_mediastinal" (below) give display windows of the HU as
channels. Slices go through the backbone in chunks of `chunk` (bounded memory),
optionally with gradient checkpointing per chunk.

Official DINOv2 weight files (`dinov2_vitb14_pretrain.pth`, `..._reg4_pretrain.pth`) are checked
against the configured size first, then loaded by timm's own checkpoint filter (register/cls token
folding, position embedding resampling from 518 px, giant's w12/w3 names).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctclip.models.tiny_cnn import slice_digests

log = logging.getLogger(__name__)


def _dinov2_archs() -> dict[str, tuple[str, int, int, int]]:
    """registry name (= torch.hub name) -> (timm architecture, embed dim, depth, register tokens)."""
    archs = {}
    for size, timm_size, dim, depth in (("s", "small", 384, 12), ("b", "base", 768, 12),
                                        ("l", "large", 1024, 24), ("g", "giant", 1536, 40)):
        archs[f"dinov2_vit{size}14"] = (f"vit_{timm_size}_patch14_dinov2", dim, depth, 0)
        archs[f"dinov2_vit{size}14_reg"] = (f"vit_{timm_size}_patch14_reg4_dinov2", dim, depth, 4)
    return archs


DINOV2_ARCHS = _dinov2_archs()
TINY_VIT = "tiny_vit"
TINY_CNN = "tiny_cnn"
REGISTERED_ENCODERS: tuple[str, ...] = (*DINOV2_ARCHS, TINY_VIT, TINY_CNN)
SLICE_NORMS = ("minmax", "window", "ct_windows", "window_mediastinal")
# "ct_windows": three display windows of the stored HU range, one per channel (the radiologist's lung,
# mediastinal and calcium/bone settings; RSNA 2019's winners fed their CNNs three brain windows the same way).
# "window_mediastinal" (tiny_cnn only): two channels, the store's whole window as "window" gives it and the
# mediastinal window (W 400, L 40) beside it, where fat, fluid, soft tissue and enhanced blood are 5x further
# apart than in the whole window and the aerated lung is flat black around anything solid in it
STORE_HU_RANGE = (-1000.0, 1000.0)  # what uint8 0 and 255 mean (ctclip_preprocess.py's default --hu_range)
CT_WINDOWS_HU = ((-1000.0, 200.0), (-160.0, 240.0), (100.0, 1000.0))
MEDIASTINAL_WINDOW_HU = (-160.0, 240.0)
SLICE_NORM_CHANNELS = {"ct_windows": 3, "window_mediastinal": 2}  # input channels a tiny_cnn gets; else 1
DINOV2_HUB_REPO = "facebookresearch/dinov2"


def _hu_windows(x: torch.Tensor, windows) -> torch.Tensor:
    """(N, 1, H, W) store grey levels (float) -> (N, len(windows), H, W): each (low, high) HU window to [0, 1]."""
    hu = STORE_HU_RANGE[0] + x * ((STORE_HU_RANGE[1] - STORE_HU_RANGE[0]) / 255.0)
    lo = torch.tensor([w[0] for w in windows], device=x.device).view(1, -1, 1, 1)
    hi = torch.tensor([w[1] for w in windows], device=x.device).view(1, -1, 1, 1)
    return ((hu - lo) / (hi - lo)).clamp(0.0, 1.0)


class SliceEncoder(nn.Module):
    """Backbone + on-device slice preprocessing + chunked encoding; output width `self.width`."""

    def __init__(self, name: str, backbone: nn.Module, width: int, mean, std, *, image_size: int,
                 chunk: int = 64, grad_checkpointing: bool = False, freeze: bool = False,
                 slice_norm: str = "minmax"):
        super().__init__()
        if slice_norm not in SLICE_NORMS:
            raise ValueError(f"slice_norm must be one of {SLICE_NORMS}, got {slice_norm!r}")
        self.slice_norm = slice_norm
        self.name = name
        self.backbone = backbone
        self.width = int(width)
        self.image_size = int(image_size)
        self.chunk = int(chunk)
        self.grad_checkpointing = grad_checkpointing
        self.frozen = freeze
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> SliceEncoder:
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode (norm statistics, dropout)
            self.backbone.eval()
        return self

    @property
    def backbone_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def preprocess(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) uint8 slices -> (N, C, S, S) normalised float32 backbone input (C: len(mean))."""
        x = slices.float()
        if self.slice_norm == "window":
            x = x / 255.0
        elif self.slice_norm == "ct_windows":
            x = _hu_windows(x, CT_WINDOWS_HU)
        elif self.slice_norm == "window_mediastinal":
            x = torch.cat([x / 255.0, _hu_windows(x, (MEDIASTINAL_WINDOW_HU,))], dim=1)
        else:
            lo = x.amin(dim=(-2, -1), keepdim=True)
            span = x.amax(dim=(-2, -1), keepdim=True) - lo
            # a constant slice (e.g. all padding) maps to 0 instead of dividing by zero
            x = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean) / self.std  # broadcasting makes the channels

    def _encode_chunk(self, slices: torch.Tensor) -> torch.Tensor:
        # float32 preprocessing, then the backbone's dtype (a model cast with .to(bfloat16) needs it)
        x = self.preprocess(slices).to(self.backbone_dtype)
        if self.frozen:
            with torch.no_grad():
                return self.backbone(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.backbone, x, use_reentrant=False)
        if getattr(self.backbone, "fixed_memo", None) is not None and self.training and slices.device.type == "cpu":
            # tiny_cnn's fixed branches: a slice's features are kept after its first time (TinySliceCNN)
            return self.backbone(x, slice_keys=slice_digests(slices))
        return self.backbone(x)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, D, H, W) -> per-slice features (B, D, width)."""
        if volumes.ndim != 5 or volumes.shape[1] != 1 or 0 in volumes.shape:
            raise ValueError(f"expected non-empty volumes of shape (B, 1, D, H, W), got {tuple(volumes.shape)}")
        b, _, d, h, w = volumes.shape
        flat = volumes.reshape(b * d, 1, h, w)
        feats = [self._encode_chunk(part) for part in flat.split(self.chunk)]
        return torch.cat(feats).reshape(b, d, -1)

    def weights_sha256(self) -> str:
        """sha256 over the backbone's state dict (names, dtypes, shapes and bytes)."""
        digest = hashlib.sha256()
        for key, tensor in self.backbone.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)};".encode())
            digest.update(memoryview(t.view(torch.uint8).numpy()))
        return digest.hexdigest()


def build_slice_encoder(name: str, *, image_size: int = 224, weights: str | Path | None = None,
                        source: str = "file", freeze: bool = False, chunk: int = 64,
                        grad_checkpointing: bool = False, slice_norm: str = "minmax", hist_bins: int = 0,
                        hist_grid: int = 2, gran_levels: int = 0) -> SliceEncoder:
    """Build a registered (`list_slice_encoders()`), `timm:<name>` or `openclip:<name>` slice encoder.
    `hist_bins` > 0 and `gran_levels` > 0 (tiny_cnn only) add its intensity-histogram and granulometry
    branches (`TinySliceCNN`)."""
    for setting, value in (("hist_bins", hist_bins), ("gran_levels", gran_levels),
                           ("slice_norm window_mediastinal", slice_norm == "window_mediastinal")):
        if value and name != TINY_CNN:
            raise ValueError(f"slice encoder {name!r}: {setting} is a {TINY_CNN} setting")
    if name in DINOV2_ARCHS:
        backbone, width, mean, std = _build_dinov2(name, image_size, weights, source)
    elif name == TINY_VIT:
        backbone, width, mean, std = _build_tiny(image_size)
    elif name == TINY_CNN:
        backbone, width, mean, std = _build_tiny_cnn(image_size, SLICE_NORM_CHANNELS.get(slice_norm, 1), hist_bins,
                                                     hist_grid, gran_levels,
                                                     hist_channels=2 if slice_norm == "window_mediastinal" else 1)
    elif name.startswith("timm:"):
        backbone, width, mean, std = _build_timm(name[len("timm:"):], image_size, weights)
    elif name.startswith("openclip:"):
        backbone, width, mean, std = _build_openclip(name[len("openclip:"):], image_size, weights)
    else:
        raise ValueError(f"unknown slice encoder {name!r}; registered: {', '.join(REGISTERED_ENCODERS)}; "
                         "or 'timm:<timm model name>' or 'openclip:<open_clip model name>'")
    return SliceEncoder(name, backbone, width, mean, std, image_size=image_size, chunk=chunk,
                        grad_checkpointing=grad_checkpointing, freeze=freeze, slice_norm=slice_norm)


def _warn_random_init(name: str) -> None:
    message = (f"slice encoder {name!r}: no weights given, the backbone is RANDOMLY initialised. "
               "Set dinov2_weights to a local weights file (or dinov2_source: hub) for real training.")
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _timm_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import timm.data

    data_cfg = timm.data.resolve_model_data_config(model)
    return tuple(data_cfg["mean"]), tuple(data_cfg["std"])


def _build_tiny(image_size: int):
    import timm

    # DINOv2's ViT layout (patch 14, layer scale) at test size; layer scale 0.1 so blocks matter. Average
    # pooling: from random init the CLS output barely depends on the image, which stalls training for
    # ~100 steps on the synthetic set; the mean of the patch tokens does not.
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=image_size,
                              embed_dim=64, depth=2, num_heads=2, init_values=0.1, global_pool="avg")
    return (model, model.num_features, *_timm_mean_std(model))


def _build_tiny_cnn(image_size: int, in_chans: int, hist_bins: int = 0, hist_grid: int = 2, gran_levels: int = 0,
                    hist_channels: int = 1):
    from ctclip.models.tiny_cnn import TinySliceCNN

    model = TinySliceCNN(image_size=image_size, in_chans=in_chans, hist_bins=hist_bins, hist_grid=hist_grid,
                         gran_levels=gran_levels, hist_channels=hist_channels)
    # grey channels centred: [0, 1] -> [-1, 1]
    return model, model.num_features, (0.5,) * in_chans, (0.5,) * in_chans


def _build_dinov2(name: str, image_size: int, weights, source: str):
    import timm

    arch = DINOV2_ARCHS[name][0]
    kwargs = dict(num_classes=0, img_size=image_size)
    if source == "hub" and weights is not None:
        raise ValueError(f"{name}: both dinov2_weights ({weights}) and dinov2_source 'hub' are set; choose one")
    if source == "hub":
        # the official module is only a carrier of the official state dict; timm's filter converts it
        hub_model = torch.hub.load(DINOV2_HUB_REPO, name)
        state = hub_model.state_dict()
        del hub_model
        check_dinov2_state_dict(state, name, f"torch.hub {DINOV2_HUB_REPO}:{name}")
        # weight_init="skip": every parameter is overwritten by the strict load (timm's own init is slow and wasted)
        model = timm.create_model(f"{arch}.lvd142m", pretrained=True, pretrained_cfg_overlay=dict(state_dict=state),
                                  weight_init="skip", **kwargs)
        model.pretrained_cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    elif source != "file":
        raise ValueError(f"dinov2_source must be 'file' or 'hub', got {source!r}")
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 weights file not found: {path}")
        check_dinov2_state_dict(_read_state_dict_lazily(path), name, str(path))
        model = timm.create_model(f"{arch}.lvd142m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                  weight_init="skip", **kwargs)
        log.info("slice encoder %s: loaded %s", name, path)
    else:
        _warn_random_init(name)
        model = timm.create_model(arch, pretrained=False, **kwargs)
    return (model, model.num_features, *_timm_mean_std(model))


def _read_state_dict_lazily(path: Path) -> dict:
    """The file's tensors memory-mapped (zip format) so checking shapes reads almost nothing."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    for key in ("state_dict", "model"):  # the wrappers timm's loader unwraps too
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def check_dinov2_state_dict(state: dict, name: str, origin: str) -> None:
    """Raise a ValueError naming expected vs found sizes when `state` is not weights for `name`.

    Accepts the official layout (`register_tokens`, `mask_token`) and timm's (`reg_token`).
    """
    arch, dim, depth, regs = DINOV2_ARCHS[name]
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        sample = ", ".join(list(state)[:6])
        raise ValueError(f"{origin}: not a DINOv2 ViT state dict (no 'cls_token'/'patch_embed.proj.weight'; "
                         f"first keys: {sample})")
    found_dim = int(state["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    found_depth = max(blocks) + 1 if blocks else 0
    reg_key = "register_tokens" if "register_tokens" in state else "reg_token"
    found_regs = int(state[reg_key].shape[1]) if reg_key in state else 0
    patch = tuple(state["patch_embed.proj.weight"].shape[-2:])
    if (found_dim, found_depth, found_regs, patch) == (dim, depth, regs, (14, 14)):
        return
    match = [n for n, (_, d, dp, r) in DINOV2_ARCHS.items() if (d, dp, r) == (found_dim, found_depth, found_regs)]
    looks_like = f" - this looks like {match[0]}" if match else ""
    raise ValueError(
        f"{origin}: DINOv2 weights do not fit slice_encoder {name!r} ({arch}): expected embed dim {dim}, "
        f"{depth} blocks, {regs} register tokens, patch 14x14; found embed dim {found_dim} "
        f"(cls_token {tuple(state['cls_token'].shape)}), {found_depth} blocks, {found_regs} register tokens, "
        f"patch {patch[0]}x{patch[1]}{looks_like}")


def _build_timm(model_name: str, image_size: int, weights):
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
    kwargs: dict = dict(num_classes=0)
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"slice encoder weights file not found: {path}")
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    else:
        _warn_random_init(f"timm:{model_name}")
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return (model, width, *_timm_mean_std(model))


def _build_openclip(model_name: str, image_size: int, weights):
    from ctclip.models.openclip_import import open_clip
    from ctclip.models.text import read_clip_state_dict

    resize_pos_embed = open_clip.model.resize_pos_embed

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    clip = open_clip.create_model(model_name, pretrained=None, force_image_size=image_size)
    if weights is None:
        _warn_random_init(f"openclip:{model_name}")
    else:
        # our reader, not open_clip's file loader: OpenAI's releases are TorchScript archives
        state = read_clip_state_dict(weights)
        resize_pos_embed(state, clip)  # ViT position grid -> image_size
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise ValueError(f"{weights}: no 'visual.*' keys; expected a full CLIP checkpoint for {model_name}")
        try:
            clip.visual.load_state_dict(visual, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights}: does not fit open_clip visual tower {model_name!r} "
                             f"at image_size {image_size}: {err}") from err
        log.info("slice encoder openclip:%s: loaded %s", model_name, weights)
    pre = getattr(clip.visual, "preprocess_cfg", None) or {}
    mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pre.get("std", open_clip.OPENAI_DATASET_STD)
    return clip.visual, clip.visual.output_dim, tuple(mean), tuple(std)

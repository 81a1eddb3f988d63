"""The model factory (in the manner of open_clip): architectures by name, their configs, the model.

    from ctclip.models import create_model, get_model_config, list_models
    list_models()                       # ['dinov2_vitb14', 'dinov2_vitg14', ..., 'tiny', 'tiny_cnn']
    model = create_model("dinov2_vitb14", dinov2_weights="weights/dinov2_vitb14_pretrain.pth")
    cfg = get_model_config("my_model.yaml", slice_chunk=16)    # a YAML file of ModelConfig fields works too

An architecture is a YAML file of `ModelConfig` fields in `ctclip/models/configs/` (package data, so an
installed ctclip knows them). `list_slice_encoders()` names the slice encoders a config may use besides
any `timm:<name>` and `openclip:<name>`. `ModelChoice` holds the training script's model flags and turns
them into a `ModelConfig` (`resolve`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctclip.models.clip3d import CTCLIP
from ctclip.models.config import ModelConfig, model_config_from_yaml
from ctclip.models.slice_encoder import REGISTERED_ENCODERS, SLICE_NORMS
from ctcore.errors import UsageError
from ctcore.schema import arg

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11 (3.10: importlib.abc)

CONFIG_SUFFIX = ".yaml"


def configs_dir() -> Traversable:
    """The folder of the architecture YAMLs inside the installed package."""
    return resources.files("ctclip.models").joinpath("configs")


def list_models() -> list[str]:
    """Architecture names (`ctclip/models/configs/<name>.yaml`), sorted."""
    return sorted(p.name[: -len(CONFIG_SUFFIX)] for p in configs_dir().iterdir() if p.name.endswith(CONFIG_SUFFIX))


def list_slice_encoders() -> list[str]:
    """Slice encoder names a `ModelConfig` may name (besides any `timm:<name>` and `openclip:<name>`)."""
    return sorted(REGISTERED_ENCODERS)


def _is_path(name_or_path: str | os.PathLike) -> bool:
    # the rule of the training script's --model_config: a name has no suffix; a path object is a path
    return isinstance(name_or_path, os.PathLike) or bool(Path(name_or_path).suffix)


def with_overrides(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """`cfg` with the given fields replaced (None-valued ones ignored; validated again). No overrides: `cfg`."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown model setting(s) {unknown}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def get_model_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of an architecture (a name of `list_models()`, or a YAML file path: anything with a
    suffix), with `overrides` (ModelConfig fields; None-valued ones ignored) applied."""
    if _is_path(name_or_path):
        cfg = model_config_from_yaml(name_or_path)
    else:
        known = list_models()
        if name_or_path not in known:
            raise UsageError(f"unknown model architecture {name_or_path!r}; known: {', '.join(known)} "
                             "(or give the path of a YAML file of ModelConfig fields)")
        with resources.as_file(configs_dir().joinpath(f"{name_or_path}{CONFIG_SUFFIX}")) as path:
            cfg = model_config_from_yaml(path)
    return with_overrides(cfg, **overrides)


def create_model(model: str | os.PathLike | ModelConfig, **overrides: Any) -> CTCLIP:
    """The 3D CLIP model (slice encoder, weights loaded and checked, + fusion + text tower) of an architecture
    name, a YAML path or a `ModelConfig`, with `overrides` as in `get_model_config`."""
    if isinstance(model, ModelConfig):
        cfg = with_overrides(model, **overrides)
    else:
        cfg = get_model_config(model, **overrides)
    return CTCLIP(cfg)


@dataclass
class ModelChoice:
    """The training script's model flags (field = flag dest): an architecture and what to change in it.

    None keeps the architecture's value; the two switches (`freeze_dinov2`, `grad_checkpointing`) can only
    turn a setting on.
    """

    model_config: str = arg("dinov2_vitb14", help="model architecture: a name (ctclip/models/configs/<name>.yaml: "
                                                  "tiny, tiny_cnn, dinov2_vits14, ...) or a YAML path")
    dinov2_model_name: str | None = arg(
        None, help="slice encoder, overriding the model config (e.g. dinov2_vitl14_reg)")
    dinov2_weights: str | None = arg(
        None, help="local official DINOv2 .pth weights (e.g. dinov2_vitb14_pretrain.pth)")
    dinov2_source: str | None = arg(None, choices=["file", "hub"], help="hub: torch.hub (needs network)")
    freeze_dinov2: bool = arg(False, help="freeze the slice encoder")
    context_length: int | None = arg(None, help="text context length (default from the model config: 77)")
    slice_chunk: int | None = arg(None, help="slices encoded per chunk (bounds memory)")
    grad_checkpointing: bool = arg(False, help="recompute each slice chunk in backward (less memory)")
    text_weights: str | None = arg(None, help="local OpenAI CLIP weights to initialise the text tower")
    slice_norm: str | None = arg(
        None, choices=list(SLICE_NORMS),
        help="slice intensities: minmax per slice, window (the store's HU window kept), ct_windows (lung, "
             "mediastinal and calcium windows as three channels) or window_mediastinal (tiny_cnn: the store's "
             "window and the mediastinal window as two channels); default from the model config")

    def resolve(self) -> ModelConfig:
        """The architecture's `ModelConfig` with these flags applied."""
        return get_model_config(
            self.model_config, slice_encoder=self.dinov2_model_name, dinov2_weights=self.dinov2_weights,
            dinov2_source=self.dinov2_source, context_length=self.context_length, slice_chunk=self.slice_chunk,
            text_weights=self.text_weights, slice_norm=self.slice_norm,
            freeze_dinov2=True if self.freeze_dinov2 else None,
            grad_checkpointing=True if self.grad_checkpointing else None)


__all__ = ["ModelChoice", "configs_dir", "create_model", "get_model_config", "list_models", "list_slice_encoders",
           "with_overrides"]

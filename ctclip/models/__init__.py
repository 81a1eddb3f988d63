"""3D CLIP models for chest CT: slice encoders, slice fusion, CLIP text tower, registry.

    from ctclip.models import build_model, model_config_from_yaml
    model = build_model(model_config_from_yaml("configs/ctclip/model_tiny.yaml"))
"""

from ctclip.models.clip3d import CTCLIP, param_groups
from ctclip.models.registry import ModelConfig, build_model, list_models, model_config_from_yaml

__all__ = ["CTCLIP", "ModelConfig", "build_model", "list_models", "model_config_from_yaml", "param_groups"]

"""3D CLIP models for chest CT: slice encoders, slice fusion, CLIP text tower, and the model factory.

    from ctclip.models import create_model, list_models
    list_models()                 # architectures: dinov2_vitb14, ..., tiny, tiny_cnn
    model = create_model("tiny")  # or a YAML path or a ModelConfig, with ModelConfig fields as overrides
"""

from ctclip.models.clip3d import CTCLIP, param_groups
from ctclip.models.config import ModelConfig, model_config_from_yaml
from ctclip.models.factory import (
    ModelChoice,
    create_model,
    get_model_config,
    list_models,
    list_slice_encoders,
)

__all__ = ["CTCLIP", "ModelChoice", "ModelConfig", "create_model", "get_model_config", "list_models",
           "list_slice_encoders", "model_config_from_yaml", "param_groups"]

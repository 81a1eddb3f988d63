"""Models of the RSNA 2019 first-place ensemble: the 2D CNNs (`cnn`), their checkpoints (`checkpoint`)
and the sequence head (`sequence`).

    from hemorrhage.models import build_cnn, list_cnns, normalize_uint8, load_original_checkpoint
    model = build_cnn("se_resnext101_32x4d")
    load_original_checkpoint(model, "models/2DNet/se_resnext101_32x4d_256/model_epoch_best_0.pth")
"""

from hemorrhage.models.checkpoint import (
    CHECKPOINT_NAME,
    FOLDS,
    SEED_ENSEMBLE,
    CheckpointError,
    ModelWeights,
    OriginalCheckpoint,
    WeightFile,
    WeightsInventory,
    check_weights,
    find_weights,
    load_original_checkpoint,
    parse_weights_folder,
    read_original_checkpoint,
    save_original_checkpoint,
)
from hemorrhage.models.cnn import (
    CNN_REGISTRY,
    PIXEL_MEAN,
    PIXEL_STD,
    HemorrhageCNN,
    build_cnn,
    cnn_spec,
    list_cnns,
    normalize_uint8,
)
from hemorrhage.models.sequence import (
    SequenceConfig,
    SequenceModel,
    SequenceOutput,
    masked_weighted_bce,
    pad_features,
    pad_studies,
    predict_both_directions,
    reverse_slices,
    sequence_loss,
)

__all__ = [
    "CHECKPOINT_NAME", "CNN_REGISTRY", "FOLDS", "PIXEL_MEAN", "PIXEL_STD", "SEED_ENSEMBLE", "CheckpointError",
    "HemorrhageCNN", "ModelWeights", "OriginalCheckpoint", "SequenceConfig", "SequenceModel", "SequenceOutput",
    "WeightFile", "WeightsInventory", "build_cnn", "check_weights", "cnn_spec", "find_weights", "list_cnns",
    "load_original_checkpoint", "masked_weighted_bce", "normalize_uint8", "pad_features", "pad_studies",
    "parse_weights_folder", "predict_both_directions", "read_original_checkpoint", "reverse_slices",
    "save_original_checkpoint", "sequence_loss",
]

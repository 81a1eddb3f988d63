"""The three 2D CNNs of the first-place RSNA 2019 ensemble, laid out so the published files load strictly.

    from hemorrhage.models import build_cnn, normalize_uint8
    model = build_cnn("DenseNet121_change_avg").eval()
    x = normalize_uint8(batch_uint8.to(device, non_blocking=True))   # (B, 3, H, W) uint8 -> float
    logits = model(x)                                                # (B, 6), order hemorrhage.classes.CLASSES
    logits, features = model(x, return_features=True)                # features: (B, model.feature_dim)

Input convention (the dataset builds it, see DESIGN 5): each sample is three adjacent windowed slices
``[s+1, s, s-1]`` as uint8 channels (B, 3, H, W), H = W = the size in the weights folder name (256, or 512
for DenseNet121). `normalize_uint8` maps them on the device to ``(x / 255 - 0.456) / 0.224`` on every
channel, which is what the original albumentations ``Normalize`` did on the CPU. Keeping batches uint8
until then moves 4x fewer bytes host -> device. A channels-last batch (e.g. ``hwc.permute(0, 3, 1, 2)``)
stays channels-last, so ``model.to(memory_format=torch.channels_last)`` needs no copy.

Attribute names follow the original ``2DNet/src/net/models.py``; they are the state-dict key prefixes:
- ``se_resnext101_32x4d``: the Cadene SE-ResNeXt in ``model_ft`` whose own ``avg_pool`` and
  ``last_linear`` were replaced (AdaptiveAvgPool2d(1); Sequential(Linear(2048, 6))): keys
  ``model_ft.layer0.conv1.weight`` ... ``model_ft.last_linear.0.bias`` (758). timm's
  ``legacy_seresnext101_32x4d`` has the same parameters under the same names, so it stands in for the
  unmaintained ``pretrainedmodels`` package (timm keeps the stem max-pool outside ``layer0``; pools have no
  weights, so the keys do not change). Cadene's SE-ResNeXt has no dropout; timm's default 0.2 is turned off.
- ``DenseNet121_change_avg`` / ``DenseNet169_change_avg``: torchvision ``densenet*.features`` in
  ``densenet121`` / ``densenet169``, then relu -> global average pool -> ``mlp`` Linear (727 / 1,015 keys).

`build_cnn(name)` never downloads weights: the published ones load with `hemorrhage.models.checkpoint`.
``tiny_densenet`` is a test-only model with the DenseNet structure at a fraction of the cost; it trains
with the "light" augmentation preset unless told otherwise (`CNNSpec.train_augment`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hemorrhage.classes import N_CLASSES

PIXEL_MEAN = 0.456  # same value on every channel, on pixel / 255
PIXEL_STD = 0.224


def normalize_uint8(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> ``(x / 255 - 0.456) / 0.224`` as ``dtype``, keeping the memory format."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects a uint8 tensor, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"normalize_uint8 expects (B, 3, H, W), got {tuple(x.shape)}")
    # one multiply-add instead of three passes; differs from the textbook order by float rounding only
    scale = 1.0 / (255.0 * PIXEL_STD)
    return x.to(dtype).mul_(scale).sub_(PIXEL_MEAN / PIXEL_STD)


class HemorrhageCNN(nn.Module):
    """A backbone + global pooling + a linear layer; the pooled vector is the sequence model's input."""

    feature_dim: int
    name: str = ""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): what the classifier layer sees."""
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from `forward_features` output."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        logits = self.classify(features)
        return (logits, features) if return_features else logits


class SEResNeXt101(HemorrhageCNN):
    """``se_resnext101_32x4d`` of the original: keys ``model_ft.*`` (758)."""

    feature_dim = 2048

    def __init__(self, num_classes: int = N_CLASSES) -> None:
        super().__init__()
        # global_pool='' leaves timm's own pool as Identity: pooling happens in `avg_pool`, as in Cadene's
        backbone = timm.create_model(
            "legacy_seresnext101_32x4d", pretrained=False, num_classes=0, global_pool="", drop_rate=0.0
        )
        backbone.avg_pool = nn.AdaptiveAvgPool2d(1)
        backbone.last_linear = nn.Sequential(nn.Linear(self.feature_dim, num_classes))
        self.model_ft = backbone

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model_ft.avg_pool(self.model_ft.forward_features(x)).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.model_ft.last_linear(features)


class DenseNetChangeAvg(HemorrhageCNN):
    """``DenseNet{121,169}_change_avg``: torchvision dense blocks, relu, average pool, ``mlp``.

    `attr` is the attribute holding ``.features`` (``densenet121``/``densenet169``): it is the key prefix.
    """

    def __init__(self, densenet: torchvision.models.DenseNet, attr: str, num_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.backbone_attr = attr
        self.add_module(attr, densenet.features)
        self.feature_dim = densenet.classifier.in_features
        self.mlp = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's DenseNet ends in norm5 without an activation; the original added the relu here
        x = F.relu(getattr(self, self.backbone_attr)(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


@dataclass(frozen=True)
class CNNSpec:
    name: str
    feature_dim: int
    build: Callable[[int], HemorrhageCNN]
    test_only: bool = False
    # training augmentation preset (hemorrhage.augment.AUGMENT_PRESETS) when TrainConfig.augment is unset:
    # the model's own data config, as timm keeps one per model
    train_augment: str = "original"


def _densenet121(num_classes: int) -> HemorrhageCNN:
    return DenseNetChangeAvg(torchvision.models.densenet121(weights=None), "densenet121", num_classes)


def _densenet169(num_classes: int) -> HemorrhageCNN:
    return DenseNetChangeAvg(torchvision.models.densenet169(weights=None), "densenet169", num_classes)


def _tiny_densenet(num_classes: int) -> HemorrhageCNN:
    # Three dense blocks of growth 16 (46k parameters, 64 features), ~2 ms per 64 px training image on one
    # CPU thread. In train_tiny.yaml's run the earlier two blocks of growth 8 (9k, 32 features) reached
    # 0.64-0.68 of the prevalence prior's held-out loss, this one 0.56-0.59 (3 seeds, 48 held-out studies).
    tiny = torchvision.models.DenseNet(growth_rate=16, block_config=(2, 2, 2), num_init_features=32, bn_size=2)
    return DenseNetChangeAvg(tiny, "densenet_tiny", num_classes)


CNN_REGISTRY: dict[str, CNNSpec] = {
    spec.name: spec
    for spec in (
        CNNSpec("se_resnext101_32x4d", 2048, SEResNeXt101),
        CNNSpec("DenseNet169_change_avg", 1664, _densenet169),
        CNNSpec("DenseNet121_change_avg", 1024, _densenet121),
        # a few thousand 64 px images in seconds: the original's warp and erasing keep it from fitting
        CNNSpec("tiny_densenet", 64, _tiny_densenet, test_only=True, train_augment="light"),
    )
}


def list_cnns(include_test_only: bool = False) -> list[str]:
    """Registered architecture names (the original class names, which are also the weights folder stems)."""
    return [n for n, s in CNN_REGISTRY.items() if include_test_only or not s.test_only]


def cnn_spec(name: str) -> CNNSpec:
    try:
        return CNN_REGISTRY[name]
    except KeyError:
        known = ", ".join(list_cnns(include_test_only=True))
        raise ValueError(f"unknown CNN {name!r}; known: {known}") from None


def build_cnn(name: str, num_classes: int = N_CLASSES) -> HemorrhageCNN:
    """A randomly initialised model (no download); load weights with `load_original_checkpoint`."""
    model = cnn_spec(name).build(num_classes)
    model.name = name
    return model

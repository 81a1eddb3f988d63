"""scripts/hemorrhage_random_weights.py's settings: the arguments of `save_random_weights` as flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ctcore.schema import arg
from hemorrhage.models.checkpoint import FOLDS, SEED_ENSEMBLE, save_random_weights
from hemorrhage.models.cnn import cnn_spec


def _member(text: str) -> tuple[str, int]:
    """ARCHITECTURE=SIZE (a flag value) -> (architecture, size)."""
    name, _, size = text.rpartition("=")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARCHITECTURE=SIZE, e.g. DenseNet121_change_avg=512")
    try:
        cnn_spec(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, int(size)


@dataclass
class RandomWeightsConfig:
    """scripts/hemorrhage_random_weights.py: the arguments of `save_random_weights`."""

    out_dir: Path = arg(help="weights folder to create")
    models: list[tuple[str, int]] = arg(default_factory=lambda: list(SEED_ENSEMBLE), type=_member,
                                        help="ARCHITECTURE=SIZE members (default: the published three)")
    folds: list[int] = arg(default_factory=lambda: list(FOLDS))
    seed: int = 0


def make_random_weights(cfg: RandomWeightsConfig) -> list[Path]:
    return save_random_weights(cfg.out_dir, cfg.models, cfg.folds, cfg.seed)

"""The settings and checks of every run of the CNN ensemble over a folder: inference and feature extraction.

    check_inputs(cfg)                 # settings, weights and sequence heads, every problem raised together
    parse_input_sizes(["256"], labels)
    describe_inputs(tta, spec, info, center_crop)   # how the CNN inputs were made (stored with features, heads)
    input_mismatches(heads, now)      # where a head's training features were made otherwise

Used by `hemorrhage.run.inference` and `hemorrhage.run.features`; a library module (imports no job).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctcore.errors import UsageError
from ctcore.precision import CHOICES as PRECISION_CHOICES
from ctcore.schema import arg
from hemorrhage.ensemble import resolve_amp, resolve_device
from hemorrhage.inference_data import SourceInfo
from hemorrhage.inputs import CENTER_CROP, RESIZE_RECIPE, TTASpec, parse_tta
from hemorrhage.models.checkpoint import FOLDS, CheckpointError, check_weights
from hemorrhage.models.sequence_checkpoint import SequenceCheckpoint, load_sequence_checkpoints
from hemorrhage.windows import WindowSpec, parse_window_spec


@dataclass
class CNNRunConfig:
    """What every run of the CNN ensemble over a folder needs (inference, feature extraction)."""

    data_dir: Path = arg(help="DICOM folder (searched recursively) or a folder made by hemorrhage_prepare.py")
    weights_dir: Path = arg(Path("models/2DNet"), help="folder of <architecture>_<size>/model_epoch_best_{fold}.pth")
    # architectures or folder names; None = every folder found
    models: list[str] | None = arg(None, help="members to use, by architecture or folder name (default: every "
                                              "folder found)")
    # None = the folds found (0-4 in the published layout)
    folds: list[int] | None = arg(None, help="folds to use; each must exist (default: the folds found, 0-4 when "
                                             "complete)")
    tta: str = arg("0", help="0: none (the original's centre crop); flip: identity, flip, channel reversal, both; "
                             "N: N random passes as the original (it used 10); random:N likewise")
    window: str = arg("header", help="DICOM input: header (the slice's own window, first value), fixed (brain "
                                     "40/80), three (brain/subdural/bone as channels), brain, subdural, bone or "
                                     "CENTER/WIDTH")
    batch_size: int = arg(32, help="slices per forward pass")
    # DataLoader workers and header readers
    num_workers: int = arg(-1, flags=("-j",), help="decoding worker processes (-1 = all CPUs, 0 = in this process)")
    device: str = arg("auto", help="auto, cpu, cuda, cuda:1 ...")
    amp: str = arg("auto", choices=PRECISION_CHOICES, help="autocast dtype; auto = bf16 on CUDA, none (fp32) on the "
                                                            "CPU; bf16 | fp16 | none (fp32, off)")
    # "N" for all, or "MEMBER=N"; default: the size in the folder name
    input_size: list[str] = arg(default_factory=list, help="model input size: N for every member or MEMBER=N "
                                                           "(default: the size in the folder name)")
    center_crop: float = arg(CENTER_CROP, help="centre crop ratio resized back, as the original's inference (1 = "
                                               "none)")
    fix_bits_stored_12: bool = arg(
        True, help="apply the community fix to BitsStored-12 / intercept > -100 slices (counted)")
    original_int: bool = arg(
        False, help="truncate WindowCenter/Width, RescaleSlope/Intercept with int() as the original did")
    seed: int = arg(0, help="seed of the random TTA passes")
    progress: bool = arg(True, action="store_false")


def parse_input_sizes(entries: list[str], labels: list[str]) -> dict[str, int]:
    """["256"] -> every member at 256; ["DenseNet121_change_avg_512=384"] -> that member only."""
    sizes: dict[str, int] = {}
    for entry in entries:
        name, sep, value = str(entry).rpartition("=")
        if not value.isdigit() or int(value) < 32:
            raise UsageError(f"--input_size {entry!r}: expected N or MEMBER=N with N >= 32")
        targets = labels if not sep else [lb for lb in labels if name in (lb, lb.rpartition("_")[0])]
        if sep and not targets:
            raise UsageError(f"--input_size {entry!r}: no loaded member {name!r} (members: {', '.join(labels)})")
        sizes.update(dict.fromkeys(targets, int(value)))
    return sizes


def library_versions() -> dict[str, str]:
    import cv2
    import pydicom
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "pydicom": pydicom.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "cuda": torch.version.cuda or ""}


def check_inputs(cfg: CNNRunConfig):
    """Everything that can be wrong with the settings and weights, raised together before any image is read."""
    try:
        tta = parse_tta(cfg.tta)
        spec = parse_window_spec(cfg.window, cfg.original_int)
        device = resolve_device(cfg.device)
        amp = resolve_amp(cfg.amp, device)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not 0.0 < cfg.center_crop <= 1.0:
        raise UsageError(f"--center_crop {cfg.center_crop}: expected 0 < ratio <= 1 (the original used 0.8)")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch_size {cfg.batch_size}: expected >= 1")
    bad_folds = sorted(set(cfg.folds or ()) - set(FOLDS))
    if bad_folds:
        raise UsageError(f"--folds {bad_folds}: the layout has folds {list(FOLDS)}")
    inv = check_weights(cfg.weights_dir, folds=cfg.folds or FOLDS, require_all_folds=cfg.folds is not None,
                        only=cfg.models or None)
    problems = list(inv.problems)
    heads: list[SequenceCheckpoint] = []
    if getattr(cfg, "sequence_weights", None) is not None:
        try:
            heads = load_sequence_checkpoints(cfg.sequence_weights)
        except (CheckpointError, FileNotFoundError) as e:
            problems.append(str(e))
    if problems:
        raise UsageError("unusable weights (nothing was read from --data_dir):\n"
                         + "\n".join(f"- {p}" for p in problems))
    return tta, spec, device, amp, inv, heads


# what features and heads made before the resize was recorded used (identical for 512x512 slices)
_BEFORE_RECORDED = {"resize": "one resize to the model size"}


def describe_inputs(tta: TTASpec, spec: WindowSpec, info: SourceInfo, center_crop: float) -> dict[str, str | float]:
    """How the CNN inputs were made: stored with extracted features and sequence heads, compared at inference."""
    return {"tta": tta.describe(), "window": info.window if info.kind == "prepared" else spec.describe(),
            "center_crop": float(center_crop), "resize": RESIZE_RECIPE}


def input_mismatches(heads: list[SequenceCheckpoint], now: dict[str, str | float]) -> list[str]:
    """Where a head's training features were made differently from this run's inputs."""
    out = []
    for h in heads:
        then = {**_BEFORE_RECORDED, **h.inputs}
        diff = [f"{k}: {then[k]!r} in training, {now[k]!r} now" for k in now if k in then and then[k] != now[k]]
        if diff:
            out.append(f"sequence head {h.path.name} was trained on features made otherwise ({'; '.join(diff)}): "
                       "its inputs shift; extract features with this run's settings or change --tta/--window/--center_crop"
                       + (" (the resize differs only for slices that are not 512x512)" if "resize" in " ".join(diff) else ""))
    return out

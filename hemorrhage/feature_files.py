"""The features file of one series as seen by one CNN fold: what extraction writes and the sequence head reads.

    write_series_features(path, sf)          # one npz, written atomically
    sf = read_series_features(path)          # FeaturesError (names the file) when it cannot be used
    files = load_features_dir("runs/features")   # every features/fold*/*.npz of an extraction folder

Keys of the npz: format (``hemorrhage-features-v1``), study_uid, series_uid, fold, role (oof | test),
sop_uids, slice_index, positions, member_names, member_sizes, weights_sha256, inputs_json, and per member
i features_{i} (S, d_i) float16 and probs_{i} (S, 6) float32. Written by `hemorrhage.run.features`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctcore.atomic import atomic_write
from ctcore.errors import UsageError
from hemorrhage.classes import CLASSES
from hemorrhage.models.sequence import FEATURE_WIDTH, pad_features
from hemorrhage.models.sequence_checkpoint import Member

FEATURES_FORMAT = "hemorrhage-features-v1"


@dataclass
class SeriesFeatures:
    """One series as seen by one CNN fold: what the sequence head reads."""

    study_uid: str
    series_uid: str
    fold: int
    role: str  # "oof": the fold's CNN did not train on this study; "test": not in the folds file
    sop_uids: list[str]
    slice_index: np.ndarray  # (S,) position of each slice in the series' full order (failed slices absent)
    positions: np.ndarray  # (S,) mm along the normal, NaN where unknown
    members: list[Member]
    features: list[np.ndarray]  # per member (S, d_m) float16
    probs: list[np.ndarray]  # per member (S, 6) float32
    weights_sha256: list[str]
    inputs: dict = field(default_factory=dict)  # how the CNN inputs were made (TTA, window, crop)
    path: Path | None = None

    @property
    def n_slices(self) -> int:
        return len(self.sop_uids)

    def padded_features(self) -> torch.Tensor:
        """(S, M, 2048) float32: every member's features zero-padded to the widest, as the head expects."""
        return pad_features([torch.from_numpy(f.astype(np.float32)) for f in self.features], FEATURE_WIDTH)

    def stacked_probs(self) -> torch.Tensor:
        """(S, M, 6) float32."""
        return torch.from_numpy(np.stack(self.probs, 1).astype(np.float32))


def write_series_features(path: Path, sf: SeriesFeatures) -> Path:
    """One npz (keys below), written atomically; features float16, probabilities float32."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FEATURES_FORMAT), "study_uid": np.array(sf.study_uid),
        "series_uid": np.array(sf.series_uid), "fold": np.array(sf.fold), "role": np.array(sf.role),
        "sop_uids": np.array(sf.sop_uids, dtype=str), "slice_index": np.asarray(sf.slice_index, np.int32),
        "positions": np.asarray(sf.positions, np.float64),
        "member_names": np.array([m[0] for m in sf.members], dtype=str),
        "member_sizes": np.array([m[1] for m in sf.members], np.int32),
        "weights_sha256": np.array(sf.weights_sha256, dtype=str),
        "inputs_json": np.array(json.dumps(sf.inputs, sort_keys=True)),
    }
    for i, (f, p) in enumerate(zip(sf.features, sf.probs)):
        arrays[f"features_{i}"] = np.asarray(f, np.float16)
        arrays[f"probs_{i}"] = np.asarray(p, np.float32)
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")  # np.savez adds .npz otherwise
    return path


class FeaturesError(ValueError):
    """A features file that cannot be used; the message names it."""


def read_series_features(path: str | os.PathLike) -> SeriesFeatures:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != FEATURES_FORMAT:
                raise FeaturesError(f"{path}: not a features file of format {FEATURES_FORMAT!r}")
            names, sizes = z["member_names"].tolist(), z["member_sizes"].tolist()
            sf = SeriesFeatures(
                str(z["study_uid"]), str(z["series_uid"]), int(z["fold"]), str(z["role"]), z["sop_uids"].tolist(),
                z["slice_index"], z["positions"], [(str(n), int(s)) for n, s in zip(names, sizes)],
                [z[f"features_{i}"] for i in range(len(names))], [z[f"probs_{i}"] for i in range(len(names))],
                z["weights_sha256"].tolist(), json.loads(str(z["inputs_json"])), path)
    except FeaturesError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, key and value errors all mean a damaged file
        raise FeaturesError(f"{path}: unreadable features file ({type(e).__name__}: {e})") from e
    s = sf.n_slices
    bad = [i for i, (f, p) in enumerate(zip(sf.features, sf.probs))
           if f.ndim != 2 or f.shape[0] != s or p.shape != (s, len(CLASSES))]
    if bad or len(sf.slice_index) != s or len(sf.positions) != s:
        raise FeaturesError(f"{path}: arrays disagree with its {s} slices (members {bad})")
    return sf


def features_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "features").glob("fold*/*.npz"))


def load_features_dir(out_dir: str | os.PathLike) -> list[SeriesFeatures]:
    """Every series file under a features folder (errors name the file)."""
    files = features_files(Path(out_dir))
    if not files:
        raise UsageError(f"{out_dir}: no features/fold*/*.npz; run hemorrhage_extract_features.py first")
    return [read_series_features(p) for p in files]

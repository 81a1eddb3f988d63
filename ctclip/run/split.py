"""Patient-wise re-split of CT-RATE's validation set into validation and test (seed: split_validation.py;
scripts/ctclip_split.py).

Patients (``<split>_<pid>`` from the VolumeName) are shuffled with the seed; the validation side is
the subset of whole patients whose volume count is closest to the target (exact subset-sum over the
shuffled order, so the choice is random but reproducible). Every other patient goes to test. The
original CSVs are kept as ``original_validation_*.csv`` and are the input of every later run, so
running twice gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctclip.data.splits import SplitError, closest_subset, patient_of
from ctcore.atomic import atomic_write, atomic_write_text
from ctcore.schema import arg

log = logging.getLogger(__name__)

# role -> (current validation file, backup of the original, test file)
FILES = {
    "metadata": ("validation_metadata.csv", "original_validation_metadata.csv", "test_metadata.csv"),
    "reports": ("validation_reports.csv", "original_validation_reports.csv", "test_reports.csv"),
    "labels": ("valid_predicted_labels.csv", "original_validation_predicted_labels.csv", "test_predicted_labels.csv"),
}



@dataclass
class SplitConfig:
    data_dir: Path = arg(help="folder with the CT-RATE validation CSVs")
    target_val_size: int = arg(500, help="volumes wanted on the validation side")
    seed: int = 42



def _previous_outputs(data_dir: Path) -> dict[str, str]:
    path = data_dir / "split_summary.json"
    try:
        return dict(json.loads(path.read_text()).get("outputs", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_validation(cfg: SplitConfig) -> dict:
    data_dir = Path(cfg.data_dir)
    if cfg.target_val_size < 0:
        raise SplitError(f"--target_val_size must be >= 0, got {cfg.target_val_size}")
    sources: dict[str, Path] = {}
    previous = _previous_outputs(data_dir)
    for role, (current, backup, _) in FILES.items():
        src = data_dir / backup if (data_dir / backup).is_file() else data_dir / current
        if not src.is_file():
            raise SplitError(f"{data_dir}: neither {backup} nor {current} exists")
        if src.name == backup and (data_dir / current).is_file():
            # the current file must be the original itself or what the last split wrote; anything else
            # means the data set was replaced and the backup belongs to older data
            digest = _sha256(data_dir / current)
            if digest not in (_sha256(src), previous.get(current)):
                raise SplitError(f"{data_dir / current} changed since the last split, and {backup} holds an "
                                 "older original: move the original_validation_*.csv files away to split the "
                                 "new data (backups are never overwritten)")
        sources[role] = src
    tables = {}
    for role, src in sources.items():
        df = pd.read_csv(src, dtype={"VolumeName": str}, keep_default_na=False, na_values=[""])
        if "VolumeName" not in df.columns:
            raise SplitError(f"{src}: no VolumeName column")
        tables[role] = df
    names = sorted(set().union(*(set(t["VolumeName"]) for t in tables.values())))
    patients: dict[str, int] = {}
    for n in names:
        patients[patient_of(n)] = patients.get(patient_of(n), 0) + 1
    order = sorted(patients)
    rng = np.random.default_rng(cfg.seed)
    order = [order[i] for i in rng.permutation(len(order))]
    val_idx = closest_subset([patients[p] for p in order], cfg.target_val_size)
    val_patients = {order[i] for i in val_idx}

    for current, backup, _ in FILES.values():  # back up once, never overwrite a backup
        if not (data_dir / backup).exists():
            shutil.copy2(data_dir / current, data_dir / backup)
            log.info("kept the original %s as %s", current, backup)
    counts = {}
    for role, (current, _, test_name) in FILES.items():
        df = tables[role]
        is_val = df["VolumeName"].map(patient_of).isin(val_patients)
        _write_csv(df[is_val], data_dir / current)
        _write_csv(df[~is_val], data_dir / test_name)
        counts[role] = {"validation": int(is_val.sum()), "test": int((~is_val).sum())}
    val_volumes = sum(patients[p] for p in val_patients)
    summary = {
        "seed": cfg.seed,
        "target_val_size": cfg.target_val_size,
        "validation": {"volumes": val_volumes, "patients": len(val_patients)},
        "test": {"volumes": len(names) - val_volumes, "patients": len(patients) - len(val_patients)},
        "rows_per_file": counts,
        "source_files": {FILES[r][1]: _sha256(data_dir / FILES[r][1]) for r in FILES},
        "outputs": {name: _sha256(data_dir / name) for r in FILES for name in (FILES[r][0], FILES[r][2])},
    }
    atomic_write_text(data_dir / "split_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))

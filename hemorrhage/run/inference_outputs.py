"""What hemorrhage inference writes: the prediction CSVs, built from one `SeriesPrediction` per series.

    paths = output_paths(Path("out/predictions.csv"))   # predictions, per_slice, per_study, run, errors, manifest
    write_frame(predictions_frame(preds), paths["predictions"])

The files and their columns are listed in `hemorrhage.run.inference`; every CSV is written through a temporary
name (ctcore.atomic), floats with 7 significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ctcore.atomic import atomic_write
from hemorrhage.classes import CLASSES
from hemorrhage.inference_data import SeriesJob
from hemorrhage.kaggle import kaggle_frame
from hemorrhage.series import Discovery

FLOAT_FORMAT = "%.7g"


def output_paths(output: Path) -> dict[str, Path]:
    stem = output.with_suffix("")
    return {"predictions": output, "per_slice": Path(f"{stem}_per_slice.csv"),
            "per_study": Path(f"{stem}_per_study.csv"), "run": Path(f"{stem}_run.json"),
            "errors": Path(f"{stem}_errors.csv"), "manifest": Path(f"{stem}_manifest.csv")}


@dataclass
class SeriesPrediction:
    job: SeriesJob
    kept: np.ndarray  # indices into the job's slices
    quirk: np.ndarray
    probs: np.ndarray  # (S, 6) final
    cnn: np.ndarray  # (S, 6) CNN ensemble alone
    window_fallback: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (S,) DEFAULT_WINDOW used


def write_frame(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format=FLOAT_FORMAT))


def slice_frame(preds: list[SeriesPrediction], with_cnn: bool) -> pd.DataFrame:
    rows = []
    for p in preds:
        j = p.job
        for i, k in enumerate(p.kept):
            row = {"StudyInstanceUID": j.study_uid, "SeriesInstanceUID": j.series_uid,
                   "SOPInstanceUID": j.sop_uids[k], "slice_index": int(k), "position": j.positions[k],
                   "flags": j.slice_flags[k], "quirk_fixed": int(p.quirk[i]),
                   "window_fallback": int(p.window_fallback[i]) if len(p.window_fallback) else 0}
            row.update(zip(CLASSES, p.probs[i].tolist()))
            if with_cnn:
                row.update(zip((f"cnn_{c}" for c in CLASSES), p.cnn[i].tolist()))
            rows.append(row)
    return pd.DataFrame(rows)


def study_frame(preds: list[SeriesPrediction]) -> pd.DataFrame:
    rows = []
    for p in preds:
        j = p.job
        flags = sorted({f for k in p.kept for f in j.slice_flags[k].split(";") if f})
        n_failed = j.n_slices - len(p.kept)
        if n_failed:
            flags.append("missing_slices")
        row = {"StudyInstanceUID": j.study_uid, "SeriesInstanceUID": j.series_uid, "n_slices": len(p.kept),
               "n_failed": n_failed, "ordered_by": j.ordered_by, "flags": ";".join(flags)}
        row.update(zip((f"max_{c}" for c in CLASSES), p.probs.max(0).tolist()))
        row.update(zip((f"mean_{c}" for c in CLASSES), p.probs.mean(0).tolist()))
        rows.append(row)
    return pd.DataFrame(rows)


def fallback_column(preds: list[SeriesPrediction], d: Discovery) -> dict[str, dict[str, object]]:
    """The manifest's window_fallback per file: 1 for a predicted slice windowed with DEFAULT_WINDOW."""
    used = {p.job.paths[k] for p in preds for i, k in enumerate(p.kept)
            if len(p.window_fallback) and p.window_fallback[i]}
    return {e.header.path: {"window_fallback": int(e.header.path in used)} for s in d.series for e in s.entries}


def predictions_frame(preds: list[SeriesPrediction]) -> pd.DataFrame:
    """predictions.csv: the six Kaggle ID,Label rows of every predicted slice, series by series."""
    return kaggle_frame((p.job.sop_uids[k], p.probs[i]) for p in preds for i, k in enumerate(p.kept))

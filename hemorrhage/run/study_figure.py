"""A figure of one predicted series: windowed slices above, per-slice probability curves below.

    python scripts/hemorrhage_plot_study.py --predictions out/predictions.csv --labels labels.csv -o study.png

The inputs are what `scripts/hemorrhage_infer.py` wrote next to ``predictions.csv``: the per-slice CSV
(probabilities in slice order), the manifest (file of every slice) and the run JSON (the DICOM folder and
the window it was run with). The slices are rendered with the run's window through the same
`hemorrhage.inputs.slice_image` the model saw, so the picture is the model's input, not a re-windowed
copy. With Kaggle labels the true positive slices of each subtype are drawn as bars above the curves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctcore.atomic import atomic_write
from ctcore.errors import UsageError
from ctcore.schema import arg
from hemorrhage.classes import CLASSES
from hemorrhage.dicom import DicomReadError
from hemorrhage.inputs import slice_image
from hemorrhage.kaggle import read_kaggle_csv
from hemorrhage.windows import parse_window_spec

SUBTYPES = CLASSES[1:]
COLOURS = dict(zip(CLASSES, ("black", "tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple")))


class FigureError(ValueError):
    """Bad input to the study figure; the message names the file."""


@dataclass
class StudyFigureConfig:
    # predictions.csv of hemorrhage_infer.py; its _per_slice/_manifest/_run files sit beside it
    predictions: Path = arg(flags=("-p",), help="predictions.csv of hemorrhage_infer.py")
    output: Path = arg(flags=("-o",), help="the PNG to write")
    labels: Path | None = arg(None, flags=("-l",), help="Kaggle ID,Label truth: marks the true slices")
    series: str = arg("", help="SeriesInstanceUID (default: the series with the highest p(any))")
    data_dir: Path | None = arg(None, help="the DICOM folder (default: the run's --data_dir)")
    n_images: int = arg(8, help="slices shown above the curves")


def sibling(predictions: Path, suffix: str) -> Path:
    """The file hemorrhage_infer.py wrote beside `predictions` (predictions_per_slice.csv, ...)."""
    return predictions.with_name(f"{predictions.stem}{suffix}")


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise FigureError(f"{path}: missing ({what}, written by hemorrhage_infer.py next to the predictions)")
    return pd.read_csv(path, dtype={"StudyInstanceUID": str, "SeriesInstanceUID": str, "SOPInstanceUID": str,
                                    "path": str}, keep_default_na=False)


def pick_series(per_slice: pd.DataFrame, series: str, where: Path) -> pd.DataFrame:
    """Rows of one series in slice order; by default the series with the highest p(any)."""
    if per_slice.empty:
        raise FigureError(f"{where}: no predicted slices")
    if not series:
        series = per_slice.loc[per_slice["any"].astype(float).idxmax(), "SeriesInstanceUID"]
    rows = per_slice[per_slice["SeriesInstanceUID"] == series]
    if rows.empty:
        raise FigureError(f"{where}: no series {series!r} (it has {per_slice['SeriesInstanceUID'].nunique()})")
    return rows.sort_values("slice_index").reset_index(drop=True)


def shown_slices(p_any: np.ndarray, n: int) -> list[int]:
    """n slice positions spread over the series, always including the slice of highest p(any)."""
    count = len(p_any)
    if count <= n:
        return list(range(count))
    picks = set(np.linspace(0, count - 1, n).round().astype(int).tolist())
    top = int(np.argmax(p_any))
    if top not in picks:
        picks.remove(min(picks, key=lambda i: abs(i - top)))
        picks.add(top)
    return sorted(picks)


def truth_of(labels: Path, sops: pd.Series) -> np.ndarray | None:
    """(slices, 6) 0/1 truth in slice order, or None when the labels do not cover these slices."""
    try:
        table = read_kaggle_csv(labels, "labels", truth=True).table
    except UsageError as e:
        raise FigureError(str(e)) from e
    if not sops.isin(table.index).all():
        return None
    y = table.loc[sops, list(CLASSES)].to_numpy(dtype=float)
    return None if np.isnan(y).any() else y


def plot_series(cfg: StudyFigureConfig) -> dict:
    """Write the figure of one series; returns what was drawn (series, slices shown, max probabilities)."""
    per_slice = _read(sibling(cfg.predictions, "_per_slice.csv"), "per-slice probabilities")
    manifest = _read(sibling(cfg.predictions, "_manifest.csv"), "manifest")
    run_path = sibling(cfg.predictions, "_run.json")
    run = json.loads(run_path.read_text()) if run_path.is_file() else {}
    data_dir = cfg.data_dir or Path(run.get("config", {}).get("data_dir", ""))
    if not str(data_dir) or not data_dir.is_dir():
        raise FigureError(f"{run_path}: the DICOM folder {str(data_dir)!r} is not there; pass --data_dir")
    rows = pick_series(per_slice, cfg.series, sibling(cfg.predictions, "_per_slice.csv"))
    paths = manifest.set_index("SOPInstanceUID")["path"]
    missing = rows.loc[~rows["SOPInstanceUID"].isin(paths.index), "SOPInstanceUID"]
    if len(missing):
        raise FigureError(f"{sibling(cfg.predictions, '_manifest.csv')}: no file for slice {missing.iloc[0]}")
    spec = parse_window_spec(run.get("config", {}).get("window", "header"))
    probs = rows[list(CLASSES)].to_numpy(dtype=float)
    truth = truth_of(cfg.labels, rows["SOPInstanceUID"]) if cfg.labels else None
    shown = shown_slices(probs[:, 0], cfg.n_images)

    fig = Figure(figsize=(2.0 * max(len(shown), 4), 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.5))
    for ax, i in zip(top.subplots(1, len(shown), squeeze=False)[0], shown):
        path = Path(paths[rows.loc[i, "SOPInstanceUID"]])
        path = path if path.is_absolute() else data_dir / path
        try:
            _, img, _ = slice_image(path, spec)
        except DicomReadError as e:
            raise FigureError(str(e)) from e
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(f"slice {i}: p(any) {probs[i, 0]:.2f}", fontsize=9)
        ax.set_axis_off()
    ax = bottom.subplots()
    x = rows["slice_index"].to_numpy()
    ax.plot(x, probs[:, 0], "--", color=COLOURS["any"], lw=1.2, label="any")
    for c, name in enumerate(SUBTYPES, start=1):
        ax.plot(x, probs[:, c], "-o", ms=3, color=COLOURS[name], lw=1.4, label=name)
        if truth is not None and truth[:, c].any():  # true slices: a bar above the curves
            level = 1.02 + 0.035 * c
            ax.scatter(x[truth[:, c] > 0], np.full(int((truth[:, c] > 0).sum()), level), marker="s", s=14,
                       color=COLOURS[name])
    for i in shown:
        ax.axvline(x[i], color="0.85", lw=0.8, zorder=0)
    ax.set(xlabel="slice (ordered along the slice normal)", ylabel="probability", ylim=(0, 1.25 if truth is not None
           else 1.02), xlim=(x.min() - 0.5, x.max() + 0.5))
    ax.legend(loc="upper left", fontsize=8, ncols=6)
    note = "squares above 1: slices labelled positive" if truth is not None else "no labels given"
    study, series = rows.loc[0, "StudyInstanceUID"], rows.loc[0, "SeriesInstanceUID"]
    fig.suptitle(f"study {study[-12:]}, series {series[-12:]}: {len(rows)} slices; {spec.describe()}; {note}",
                 fontsize=10)
    atomic_write(cfg.output, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return {"series": series, "study": study, "n_slices": len(rows), "shown": shown, "output": str(cfg.output),
            "max_probability": dict(zip(CLASSES, probs.max(axis=0).round(4).tolist())),
            "labelled": truth is not None}

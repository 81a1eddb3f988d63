"""scripts/hemorrhage_eval.py: Kaggle-format predictions against labels -> the competition metric, AUROC and
bootstrap intervals (the numbers come from `hemorrhage.metrics`; this module reads, checks and writes).

Both inputs are ``ID,Label`` CSVs with ``ID = <SOPInstanceUID>_<class>``. IDs are matched exactly as
strings (an ``ID_`` prefix is part of the UID). IDs found in one file only, and slices without all six
class rows, are counted and reported (metrics.json, a warning), never dropped silently; the metrics use
the slices complete in both files. Rows with the same ID and the same value (Kaggle's own
stage_2_train.csv has some) are collapsed and counted; the same ID with different values is an error.

Outputs in the output folder: metrics.json, metrics.csv (one row per class + a ``weighted/macro`` row),
roc_curves.png. `run_eval` raises `UsageError` (exit status 2) for bad input, naming the file and line.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ctcore.atomic import atomic_write
from ctcore.cli import resolved
from ctcore.errors import UsageError
from ctcore.schema import arg
from hemorrhage.classes import CLASS_WEIGHTS, CLASSES
from hemorrhage.kaggle import KaggleTable, read_kaggle_csv, read_string_csv, sha256
from hemorrhage.metrics import baseline_log_loss, bootstrap_metrics, per_class_log_loss, prior_baseline

log = logging.getLogger(__name__)
N_EXAMPLES = 20
SUMMARY_ROW = "weighted/macro"


@dataclass
class EvalConfig:
    predictions: Path = arg(flags=("-p",), help="ID,Label CSV of probabilities (e.g. predictions.csv from "
                                               "hemorrhage_infer.py)")
    labels: Path = arg(flags=("-l",), help="ID,Label CSV of 0/1 truth")
    output_dir: Path = arg(flags=("-o",), help="folder for metrics.json, metrics.csv, roc_curves.png")
    per_slice: Path | None = arg(
        None, help="predictions_per_slice.csv (SOPInstanceUID + group column): resample whole groups")
    group_column: str = arg(
        "StudyInstanceUID", help="the --per_slice column that groups slices (StudyInstanceUID or SeriesInstanceUID)")
    train_labels: Path | None = arg(
        None, help="ID,Label training labels: their prevalence is the prior baseline (default: the evaluated "
                   "labels' own prevalence, labelled as such)")
    n_bootstrap: int = arg(1000, help="bootstrap resamples (0 = no intervals)")
    ci: float = arg(0.95, help="confidence level of the percentile intervals")
    seed: int = 0


def read_groups(path: Path, column: str, sops: pd.Index) -> np.ndarray:
    """The `column` value (e.g. StudyInstanceUID) of every slice in `sops`, from predictions_per_slice.csv."""
    df = read_string_csv(path, "per-slice")
    where = f"per-slice file {path}"
    for col in ("SOPInstanceUID", column):
        if col not in df.columns:
            raise UsageError(f"{where}: no column {col!r} (columns: {', '.join(map(str, df.columns))})")
    empty = df[column].str.strip() == ""
    if empty.any():
        raise UsageError(f"{where}, line {int(np.flatnonzero(empty.to_numpy())[0]) + 2}: empty {column}")
    pairs = df[["SOPInstanceUID", column]].drop_duplicates()
    clash = pairs["SOPInstanceUID"].duplicated()
    if clash.any():
        raise UsageError(f"{where}: SOPInstanceUID {pairs['SOPInstanceUID'][clash].iat[0]!r} has several {column}s")
    mapping = pairs.set_index("SOPInstanceUID")[column]
    absent = sops.difference(mapping.index)
    if len(absent):
        raise UsageError(f"{where}: {len(absent)} evaluated slices have no row (matched exactly on "
                         f"SOPInstanceUID), e.g. {list(absent[:5])}")
    return mapping.reindex(sops).to_numpy()


def _examples(index: pd.Index) -> list[str]:
    return sorted(map(str, index))[:N_EXAMPLES]


def match(preds: KaggleTable, labels: KaggleTable) -> tuple[pd.Index, dict[str, Any]]:
    """The slices complete in both files (sorted) and the bookkeeping of everything else."""
    only_p, only_l = preds.ids.difference(labels.ids), labels.ids.difference(preds.ids)
    sops = preds.complete().intersection(labels.complete()).sort_values()
    report = {
        "n_ids_predictions": len(preds.ids), "n_ids_labels": len(labels.ids),
        "n_ids_matched": len(preds.ids.intersection(labels.ids)),
        "n_ids_only_in_predictions": len(only_p), "examples_only_in_predictions": _examples(only_p),
        "n_ids_only_in_labels": len(only_l), "examples_only_in_labels": _examples(only_l),
        "n_slices_evaluated": len(sops),
        "incomplete_slices": {role: {"n": len(t.incomplete()), "examples": _examples(t.incomplete())}
                              for role, t in (("predictions", preds), ("labels", labels))},
        "n_duplicate_rows_collapsed": {"predictions": preds.n_duplicate_rows, "labels": labels.n_duplicate_rows},
    }
    return sops, report


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def _replace(path: Path, write) -> None:
    atomic_write(path, write, suffix=path.suffix)  # matplotlib and pandas read the suffix


def metrics_frame(result: dict, baseline: dict) -> pd.DataFrame:
    rows = []
    for name, c in result["per_class"].items():
        rows.append({"class": name, "weight": c["weight"], "n": c["n"], "n_pos": c["n_pos"],
                     "prevalence": c["n_pos"] / c["n"], "auroc": c["auroc"], "auroc_lower": c["lower"],
                     "auroc_upper": c["upper"], "log_loss": c["log_loss"], "log_loss_lower": c["log_loss_lower"],
                     "log_loss_upper": c["log_loss_upper"], "baseline_log_loss": baseline["per_class_log_loss"][name],
                     "n_resamples_undefined": c["n_resamples_undefined"], "reason": c["reason"] or ""})
    m, w = result["mean_auroc"], result["weighted_log_loss"]
    rows.append({"class": SUMMARY_ROW, "weight": sum(CLASS_WEIGHTS), "n": result["n_slices"], "auroc": m["value"],
                 "auroc_lower": m["lower"], "auroc_upper": m["upper"], "log_loss": w["value"],
                 "log_loss_lower": w["lower"], "log_loss_upper": w["upper"],
                 "baseline_log_loss": baseline["weighted_log_loss"],
                 "n_resamples_undefined": m["n_resamples_undefined"],
                 "reason": "auroc: mean over classes with both labels; log_loss: the competition metric"})
    df = pd.DataFrame(rows)
    df["n_pos"] = df["n_pos"].astype("Int64")  # blank in the summary row
    return df


def _ci(lower: float, upper: float, digits: int) -> str:
    return "" if math.isnan(lower) else f" [{lower:.{digits}f}, {upper:.{digits}f}]"


def plot_roc_curves(path: Path, result: dict, y: np.ndarray, p: np.ndarray) -> None:
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (c, name) in zip(fig.subplots(2, 3).ravel(), enumerate(CLASSES)):
        r = result["per_class"][name]
        ax.plot([0, 1], [0, 1], "--", color="0.7", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="false positive rate", ylabel="true positive rate",
               title=f"{name} (n={r['n']}, positive {r['n_pos']})")
        if r["reason"]:
            ax.text(0.5, 0.5, r["reason"], ha="center", va="center", fontsize=8, wrap=True)
            continue
        fpr, tpr, _ = roc_curve(y[:, c], p[:, c])
        ax.plot(fpr, tpr, lw=1.4, label=f"AUROC {r['auroc']:.3f}{_ci(r['lower'], r['upper'], 3)}")
        ax.legend(loc="lower right", fontsize=8)
    w = result["weighted_log_loss"]
    fig.suptitle(f"weighted log loss {w['value']:.4f}{_ci(w['lower'], w['upper'], 4)}; {result['ci']:.0%} CI "
                 f"from {result['n_bootstrap']} resamples of {result['unit_label']}")
    _replace(path, lambda t: fig.savefig(t, dpi=100, format="png"))


@dataclass
class EvalSummary:
    metrics: dict
    output_dir: Path

    def line(self) -> str:
        m = self.metrics
        w, a, b, boot = m["weighted_log_loss"], m["mean_auroc"], m["baseline"], m["bootstrap"]
        ci = "" if math.isnan(w["lower"]) else f"; {boot['ci']:.0%} CI over {boot['unit_label']}"
        return (f"weighted log loss {w['value']:.4f}{_ci(w['lower'], w['upper'], 4)} (prior baseline "
                f"{b['weighted_log_loss']:.4f}, {b['source']}); mean AUROC {a['value']:.4f}{_ci(a['lower'], a['upper'], 4)}; "
                f"{m['matching']['n_slices_evaluated']} slices{ci} -> {self.output_dir}")


def _baseline(cfg: EvalConfig, y: np.ndarray) -> dict[str, Any]:
    if cfg.train_labels is None:
        prior, source = prior_baseline(y), "evaluated labels' own prevalence (optimistic: no --train_labels)"
    else:
        train = read_kaggle_csv(cfg.train_labels, "train labels", truth=True)
        complete = train.complete()
        if not len(complete):
            raise UsageError(f"train labels file {cfg.train_labels}: no slice has all six class rows")
        prior, source = prior_baseline(train.table.loc[complete].to_numpy()), "train labels' prevalence"
    return {"source": source, "prior": dict(zip(CLASSES, prior.tolist())),
            "weighted_log_loss": baseline_log_loss(prior, y),
            "per_class_log_loss": dict(zip(CLASSES, per_class_log_loss(y, np.broadcast_to(prior, y.shape)).tolist()))}


def run_eval(cfg: EvalConfig) -> EvalSummary:
    if cfg.n_bootstrap < 0 or not 0.0 < cfg.ci < 1.0:
        raise UsageError(f"need --n_bootstrap >= 0 and 0 < --ci < 1, got {cfg.n_bootstrap} and {cfg.ci}")
    preds = read_kaggle_csv(cfg.predictions, "predictions", truth=False)
    labels = read_kaggle_csv(cfg.labels, "labels", truth=True)
    sops, report = match(preds, labels)
    if not len(sops):
        raise UsageError(f"no slice has all six classes in both {cfg.predictions} and {cfg.labels} "
                         f"({report['n_ids_matched']} IDs in common)")
    if report["n_ids_only_in_predictions"] or report["n_ids_only_in_labels"] or any(
            v["n"] for v in report["incomplete_slices"].values()):
        log.warning("IDs not in both files: %d only in predictions (e.g. %s), %d only in labels (e.g. %s); slices "
                    "without all six classes: %d in predictions, %d in labels; metrics use the %d slices complete "
                    "in both (see metrics.json 'matching')", report["n_ids_only_in_predictions"],
                    report["examples_only_in_predictions"][:3], report["n_ids_only_in_labels"],
                    report["examples_only_in_labels"][:3], report["incomplete_slices"]["predictions"]["n"],
                    report["incomplete_slices"]["labels"]["n"], len(sops))
    y, p = labels.table.loc[sops].to_numpy(), preds.table.loc[sops].to_numpy()
    groups = read_groups(cfg.per_slice, cfg.group_column, sops) if cfg.per_slice is not None else None
    baseline = _baseline(cfg, y)  # reads --train_labels: its errors come before the bootstrap
    result = bootstrap_metrics(y, p, groups, cfg.n_bootstrap, cfg.ci, cfg.seed)
    unit = cfg.group_column if groups is not None else "slice"
    result["unit_label"] = (f"{result['n_units']} slices (independently: no --per_slice)" if groups is None
                            else f"{result['n_units']} {unit} values")
    note = ("slices resampled independently (no --per_slice): slices of one study are correlated, so these "
            "intervals are too narrow" if groups is None else f"cluster bootstrap: whole {unit} groups drawn")
    if groups is None:
        log.warning("%s", note)
    inputs = {role: {"path": str(t.path), "sha256": t.sha256, "n_rows": t.n_rows}
              for role, t in (("predictions", preds), ("labels", labels))}
    for role, path in (("per_slice", cfg.per_slice), ("train_labels", cfg.train_labels)):
        if path is not None:
            inputs[role] = {"path": str(path), "sha256": sha256(path)}
    metrics = {
        "weighted_log_loss": result["weighted_log_loss"], "mean_auroc": result["mean_auroc"],
        "per_class": result["per_class"], "baseline": baseline,
        "bootstrap": {"n_bootstrap": cfg.n_bootstrap, "ci": cfg.ci, "seed": cfg.seed, "unit": unit,
                      "n_units": result["n_units"], "unit_label": result["unit_label"], "note": note},
        "matching": report, "inputs": inputs, "settings": resolved(cfg),
    }
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / "metrics.json", lambda t: t.write_text(json.dumps(_jsonable(metrics), indent=2)))
    _replace(out / "metrics.csv", lambda t: metrics_frame(result, baseline).to_csv(t, index=False))
    plot_roc_curves(out / "roc_curves.png", result, y, p)
    return EvalSummary(metrics, out)

"""Files of a zero-shot evaluation run (`ctclip.run.evaluate`), each written atomically:

- `scores.csv`: P(present) per volume (VolumeName + the 18 findings); with --aggregate scan also
  `scores_per_scan.csv` (ScanName + 18), the units the metrics were computed on;
- `logits.csv` (and `logits_per_scan.csv`): the same as logits, log(p / (1 - p)) = scale * (cos(present) -
  cos(absent)), which the metrics rank by: P(present) rounds to exactly 1.0 for confident volumes;
- `metrics_per_finding.csv`: per finding n, positives, prevalence, threshold, and every metric with its
  CI bounds (`auroc`, `auroc_lower`, `auroc_upper`, ...), the reason when undefined;
- `summary.json`: macro means with CIs, protocol and notes, thresholds (what `--threshold file:` reads),
  model and data checksums, the resolved config, package versions, timings;
- `roc_curves.png`: one ROC panel per finding, AUROC and its CI in the title;
- `retrieval.json`: recall@1/5/10 both ways, when a reports CSV was given.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
from scipy.special import expit
from sklearn.metrics import roc_curve

from ctclip.findings import FINDINGS
from ctclip.metrics import METRICS, EvaluationResult
from ctcore.atomic import atomic_write
from ctcore.cli import resolved


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _replace_into(path: Path, write) -> None:
    atomic_write(path, write, suffix=path.suffix)  # matplotlib and pandas read the suffix


def _json_safe(value: Any) -> Any:
    """NaN/inf -> null (strict JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    _replace_into(path, lambda p: p.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"))


def write_scores(path: Path, key: str, names: Sequence[str], scores: np.ndarray) -> None:
    df = pd.DataFrame(scores, columns=list(FINDINGS))
    df.insert(0, key, list(names))
    _replace_into(path, lambda p: df.to_csv(p, index=False, float_format="%.17g"))  # float64 round-trips


def metrics_table(result: EvaluationResult) -> pd.DataFrame:
    rows = []
    for f in result.findings:
        row: dict[str, Any] = {"finding": f.name, "n": f.n, "n_positive": f.n_positive, "prevalence": f.prevalence,
                               "threshold": f.threshold}
        for m in METRICS:
            row.update({m: f.values[m], f"{m}_lower": f.lower[m], f"{m}_upper": f.upper[m]})
        row.update(n_resamples_undefined=f.n_resamples_undefined, undefined=f.undefined or "")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_roc_curves(path: Path, result: EvaluationResult, labels: np.ndarray, scores: np.ndarray) -> None:
    cols = 6
    rows = math.ceil(len(result.findings) / cols)
    fig = Figure(figsize=(3.0 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (j, f) in zip(axes.ravel(), enumerate(result.findings)):
        ax.plot([0, 1], [0, 1], "--", color="0.7", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        if f.undefined:
            ax.set_title(f"{f.name}\nundefined", fontsize=8)
            ax.text(0.5, 0.5, f.undefined.split(":")[0], ha="center", va="center", fontsize=7, wrap=True)
            continue
        keep = ~np.isnan(labels[:, j])
        fpr, tpr, _ = roc_curve(labels[keep, j], scores[keep, j])
        ax.plot(fpr, tpr, color="#2b6cb0", lw=1.4)
        auroc = f"AUROC {f.values['auroc']:.3f}"
        if result.n_bootstrap:  # without resampling the bounds are the point itself: not shown
            auroc += f" [{f.lower['auroc']:.3f}, {f.upper['auroc']:.3f}]"
        ax.set_title(f"{f.name}\n{auroc}\nn={f.n}, pos={f.n_positive}", fontsize=8)
    for ax in axes.ravel()[len(result.findings):]:
        ax.axis("off")
    m = result.macro["auroc"]
    ci = f" [{m['lower']:.3f}, {m['upper']:.3f}]" if result.n_bootstrap else ""
    fig.suptitle(f"Zero-shot ROC ({result.protocol} protocol): macro AUROC {m['value']:.3f}{ci} over "
                 f"{m['n_findings']} findings", fontsize=11)
    fig.supxlabel("false positive rate", fontsize=9)
    fig.supylabel("true positive rate", fontsize=9)
    _replace_into(path, lambda p: fig.savefig(p, dpi=110, format="png"))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for dist in ("ct-toolkit", "numpy", "scikit-learn", "timm", "open-clip-torch", "x-transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write_outputs(out: Path, cfg: Any, result: EvaluationResult, units: Sequence[str], unit_scores: np.ndarray,
                  unit_labels: np.ndarray, volume_names: Sequence[str], volume_scores: np.ndarray,
                  retrieval: dict[str, Any] | None, provenance: dict[str, Any]) -> dict[str, Any]:
    """`unit_scores` and `volume_scores` are logits (zero-shot margins); the probabilities are derived."""
    out.mkdir(parents=True, exist_ok=True)
    write_scores(out / "scores.csv", "VolumeName", volume_names, expit(volume_scores))
    write_scores(out / "logits.csv", "VolumeName", volume_names, volume_scores)
    if len(units) != len(volume_names) or list(units) != list(volume_names):
        write_scores(out / "scores_per_scan.csv", "ScanName", units, expit(unit_scores))
        write_scores(out / "logits_per_scan.csv", "ScanName", units, unit_scores)
    table = metrics_table(result)
    _replace_into(out / "metrics_per_finding.csv", lambda p: table.to_csv(p, index=False))
    plot_roc_curves(out / "roc_curves.png", result, unit_labels, unit_scores)
    if retrieval is not None:
        write_json(out / "retrieval.json", retrieval)
    summary = {
        "protocol": result.protocol,
        "macro": result.macro,
        "n_units": len(units),
        "unit": "scan" if cfg.aggregate == "scan" else "volume",
        "n_bootstrap": result.n_bootstrap,
        "ci": result.ci,
        "bootstrap_unit": cfg.bootstrap_unit if result.n_bootstrap else None,
        "excluded_findings": result.excluded,
        "notes": result.notes,
        "thresholds": {f.name: f.threshold for f in result.findings},
        "threshold_rule": cfg.threshold or ("ctclip" if result.protocol == "ctclip" else "youden"),
        "findings": {f.name: {"n": f.n, "n_positive": f.n_positive, "prevalence": f.prevalence,
                              "values": f.values, "lower": f.lower, "upper": f.upper, "undefined": f.undefined}
                     for f in result.findings},
        "retrieval": retrieval,
        **provenance,
        "config": resolved(cfg),
        "versions": versions(),
        "outputs": {"scores": str(out / "scores.csv"), "logits": str(out / "logits.csv"), "metrics": str(out / "metrics_per_finding.csv"),
                    "roc_curves": str(out / "roc_curves.png"),
                    "retrieval": str(out / "retrieval.json") if retrieval is not None else None},
    }
    write_json(out / "summary.json", summary)
    return _json_safe(summary)

"""Benchmark: bootstrap confidence intervals, vectorised engine vs a loop of sklearn calls.

    python benchmarks/bench_metrics.py                      # the issue's size: 1000 x 18 x 2489, ~3 min on 2 cores
    python benchmarks/bench_metrics.py --n_bootstrap 200 --json out.json

One run, the same data and the same resamples for both:
- reference: for each resample and finding, sklearn's roc_auc_score, average_precision_score,
  roc_curve (Youden operating point), f1_score, accuracy_score, precision_score and recall_score
  (sensitivity and specificity), then np.percentile over the resamples;
- ours: `ctclip.metrics.evaluate_findings` (every resample at once from a count matrix).
Data: CT-RATE's test size (2,489 volumes) and 18 findings at CT-RATE-like prevalences (2-45 %),
scores from a noisy logistic model rounded to float32 as a scores.csv would hold them; 10 % of the
labels unknown (NaN) so the per-finding row dropping is exercised. Prints the time of each, the
ratio and the largest CI difference over every finding and metric (target: >= 50x, identical CIs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ctclip.findings import FINDINGS
from ctclip.metrics import METRICS, evaluate_findings
from ctcore.bootstrap import bootstrap_counts, counts_to_indices
from ctcore.cli import parse_args

# rough CT-RATE prevalences of the 18 findings (order of FINDINGS)
PREVALENCE = (0.11, 0.28, 0.10, 0.07, 0.25, 0.14, 0.26, 0.20, 0.26, 0.45, 0.37, 0.27, 0.12, 0.08, 0.11, 0.17,
              0.10, 0.08)


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(FINDINGS))) < np.array(PREVALENCE)).astype(np.float64)
    logits = rng.normal(size=labels.shape) + 1.3 * labels
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    labels[rng.random(labels.shape) < 0.1] = np.nan
    return labels, scores


def reference_loop(labels: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per finding and metric, the (B,) values of a plain sklearn loop over the same resamples."""
    out = {}
    for j, name in enumerate(FINDINGS):
        keep = ~np.isnan(labels[:, j])
        y_all, s_all = labels[keep, j], scores[keep, j]
        values = {m: [] for m in METRICS}
        for row in counts[:, keep]:
            idx = counts_to_indices(row)
            y, s = y_all[idx], s_all[idx]
            fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
            pred = (s >= thr[np.argmax(tpr - fpr)]).astype(int)
            values["auroc"].append(roc_auc_score(y, s))
            values["auprc"].append(average_precision_score(y, s))
            values["f1"].append(f1_score(y, pred, zero_division=np.nan))
            values["accuracy"].append(accuracy_score(y, pred))
            values["precision"].append(precision_score(y, pred, zero_division=np.nan))
            values["recall"].append(recall_score(y, pred, zero_division=np.nan))
            values["specificity"].append(recall_score(y, pred, pos_label=0, zero_division=np.nan))
        out[name] = {m: np.asarray(v) for m, v in values.items()}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_volumes", type=int, default=2489)
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--ci", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    labels, scores = make_data(args.n_volumes, args.seed)
    q = [100 * (1 - args.ci) / 2, 100 * (1 + args.ci) / 2]

    t0 = time.perf_counter()
    ours = evaluate_findings(labels, scores, FINDINGS, n_bootstrap=args.n_bootstrap, ci=args.ci, seed=args.seed)
    t_ours = time.perf_counter() - t0

    counts = bootstrap_counts(len(labels), args.n_bootstrap, args.seed)  # the same resamples
    t0 = time.perf_counter()
    ref = reference_loop(labels, scores, counts)
    ref_ci = {f: {m: np.nanpercentile(v, q) for m, v in per.items()} for f, per in ref.items()}
    t_ref = time.perf_counter() - t0

    max_ci_diff = max_value_diff = 0.0
    for f in ours.findings:
        for m in METRICS:
            max_ci_diff = max(max_ci_diff, abs(f.lower[m] - ref_ci[f.name][m][0]), abs(f.upper[m] - ref_ci[f.name][m][1]))
            max_value_diff = max(max_value_diff, float(np.nanmax(np.abs(f.resamples[m] - ref[f.name][m]))))
    ratio = t_ref / t_ours
    auroc = ours.macro["auroc"]
    print(f"bootstrap metrics: {args.n_bootstrap} resamples x {len(FINDINGS)} findings x {args.n_volumes} volumes, "
          f"{len(METRICS)} metrics + Youden threshold per resample")
    print("| implementation | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| sklearn loop (reference) | {t_ref:.2f} | 1.0 |")
    print(f"| ctclip.metrics (vectorised) | {t_ours:.3f} | {ratio:.1f} |")
    print(f"largest difference: per-resample value {max_value_diff:.2e}, CI bound {max_ci_diff:.2e}")
    print(f"macro AUROC {auroc['value']:.4f} [{auroc['lower']:.4f}, {auroc['upper']:.4f}]")
    print(f"target >= 50x with identical CIs: {'met' if ratio >= 50 and max_ci_diff <= 1e-12 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({
            "n_bootstrap": args.n_bootstrap, "n_volumes": args.n_volumes, "n_findings": len(FINDINGS),
            "seconds_reference": t_ref, "seconds_ours": t_ours, "speedup": ratio,
            "max_ci_difference": max_ci_diff, "max_value_difference": max_value_diff,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot evaluation of a trained 3D CLIP model on the 18 CT-RATE findings (seed: eval.py / zero_shot.py).

    # our protocol: percentile bootstrap CIs (1000 resamples of patients), Youden operating point
    python scripts/ctclip_eval.py --model_path runs/vitb/best.pt --test_data data/valid_volumes.h5 \\
        --test_labels data/ct_rate/test_predicted_labels.csv --reports data/ct_rate/test_reports.csv \\
        --output_dir runs/vitb/eval_test
    # the CT-CLIP reference code's numbers, for comparison with published tables
    python scripts/ctclip_eval.py ... --metric_protocol ctclip --output_dir runs/vitb/eval_test_ctclip
    # thresholds chosen on the validation split, applied to the test split
    python scripts/ctclip_eval.py ... --test_labels data/ct_rate/valid_predicted_labels.csv --output_dir runs/vitb/eval_valid
    python scripts/ctclip_eval.py ... --threshold file:runs/vitb/eval_valid/summary.json --output_dir runs/vitb/eval_test

Outputs in --output_dir: scores.csv (P(present)), logits.csv (what the metrics rank by), metrics_per_finding.csv, summary.json, roc_curves.png and, with
--reports, retrieval.json (see ctclip/run/eval_outputs.py). Exit status: 0 done, 2 bad input (the message
names the file, column, volume or flag).
"""

from __future__ import annotations

import argparse
import sys

from ctclip.checkpoint import CheckpointError
from ctclip.data.reports import TableError
from ctclip.run.evaluate import EvalConfig, EvalError, evaluate
from ctcore import schema


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(EvalConfig, description=__doc__)


def report(summary: dict, cfg: EvalConfig) -> None:
    m = summary["macro"]["auroc"]
    ci = (f" [{m['lower']:.3f}, {m['upper']:.3f}] ({100 * summary['ci']:.0f}% CI, {summary['n_bootstrap']} "
          f"resamples by {summary['bootstrap_unit']})" if summary["n_bootstrap"] else " (no resampling: ctclip protocol)")
    print(f"zero-shot macro AUROC {m['value']:.3f}{ci} over {m['n_findings']} findings, {summary['n_units']} "
          f"{summary['unit']}s, {summary['protocol']} protocol")
    if summary["excluded_findings"]:
        print(f"left out (one class only): {', '.join(summary['excluded_findings'])}")
    if summary["retrieval"]:
        r = summary["retrieval"]
        print("retrieval R@1/5/10 volume->text " + "/".join(f"{r['volume_to_text'][f'R@{k}']:.3f}" for k in (1, 5, 10))
              + ", text->volume " + "/".join(f"{r['text_to_volume'][f'R@{k}']:.3f}" for k in (1, 5, 10)))
    print(f"ROC figure: {summary['outputs']['roc_curves']}")
    print(f"metrics: {summary['outputs']['metrics']}  summary: {cfg.output_dir / 'summary.json'}")


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(EvalConfig, evaluate, argv, parser=build_parser(), name="ctclip_eval", report=report,
                           errors=(EvalError, CheckpointError, TableError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())

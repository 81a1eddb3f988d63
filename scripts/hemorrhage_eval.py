"""Evaluate hemorrhage predictions against labels: the RSNA 2019 weighted log loss, per-class AUROC, bootstrap CIs.

    python scripts/hemorrhage_eval.py --predictions out/predictions.csv --labels labels.csv --output_dir out/eval
    python scripts/hemorrhage_eval.py --predictions out/predictions.csv --labels labels.csv -o out/eval \\
        --per_slice out/predictions_per_slice.csv --train_labels train_labels.csv --n_bootstrap 2000 --seed 1
    python scripts/hemorrhage_eval.py --config configs/hemorrhage/eval.yaml --predictions P --labels L -o OUT

Both files are Kaggle format ``ID,Label`` with ``ID = <SOPInstanceUID>_<class>`` (IDs matched exactly).
With ``--per_slice`` (written by scripts/hemorrhage_infer.py) whole studies are resampled (``--group_column
SeriesInstanceUID`` for series); without it slices are resampled, which understates the uncertainty.
Writes OUT/metrics.json, OUT/metrics.csv and OUT/roc_curves.png (see hemorrhage/run/evaluate.py) and prints
one summary line. Exit status: 0 done, 2 bad input (the message names the file and line).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError
from hemorrhage.run.evaluate import EvalConfig, run_eval


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", "-p", type=Path, required=True,
                   help="ID,Label CSV of probabilities (e.g. predictions.csv from hemorrhage_infer.py)")
    p.add_argument("--labels", "-l", type=Path, required=True, help="ID,Label CSV of 0/1 truth")
    p.add_argument("--output_dir", "-o", type=Path, required=True,
                   help="folder for metrics.json, metrics.csv, roc_curves.png")
    p.add_argument("--per_slice", type=Path, default=None,
                   help="predictions_per_slice.csv (SOPInstanceUID + group column): resample whole groups")
    p.add_argument("--group_column", default="StudyInstanceUID",
                   help="the --per_slice column that groups slices (StudyInstanceUID or SeriesInstanceUID)")
    p.add_argument("--train_labels", type=Path, default=None,
                   help="ID,Label training labels: their prevalence is the prior baseline (default: the "
                        "evaluated labels' own prevalence, labelled as such)")
    p.add_argument("--n_bootstrap", type=int, default=1000, help="bootstrap resamples (0 = no intervals)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the percentile intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(EvalConfig, args)
    try:
        summary = run_eval(cfg)
    except UsageError as e:
        logging.getLogger("hemorrhage_eval").error("%s", e)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import sys

from ctcore import schema
from hemorrhage.run.evaluate import EvalConfig, run_eval


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(EvalConfig, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(EvalConfig, run_eval, argv, parser=build_parser(), name="hemorrhage_eval",
                           report=lambda summary, cfg: print(summary.line()))


if __name__ == "__main__":
    sys.exit(main())

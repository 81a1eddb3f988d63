"""RSNA 2019 first-place ensemble on head CT DICOM studies -> per-slice and per-series probabilities
(seed: inference/run_inference.py).

    python scripts/hemorrhage_infer.py --data_dir /data/dicoms --output out/predictions.csv
    python scripts/hemorrhage_infer.py --data_dir /data/processed --weights_dir models/2DNet --tta 10
    python scripts/hemorrhage_infer.py --config configs/hemorrhage/infer.yaml --data_dir D --output O.csv \\
        --models DenseNet121_change_avg --folds 0 1 --sequence_weights runs/sequence/

--data_dir is a folder of DICOM files (any names, any depth, several studies and series) or a folder
written by scripts/hemorrhage_prepare.py (detected by its manifest.csv). --weights_dir holds one folder
per ensemble member, <architecture>_<training size>/model_epoch_best_{fold}.pth (the published layout:
se_resnext101_32x4d_256/, DenseNet169_change_avg_256/, DenseNet121_change_avg_512/); absent members
are left out with a message. Writes predictions.csv (Kaggle ID,Label) and, beside it,
predictions_per_slice.csv, predictions_per_study.csv, predictions_run.json, predictions_errors.csv
and (DICOM input) predictions_manifest.csv; see hemorrhage/run/inference.py.

Exit status: 0 every file used, 2 unusable weights or input (nothing written), 3 some files could not
be read (listed in predictions_errors.csv; everything else was predicted and written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError
from hemorrhage.run.inference import InferConfig, add_cnn_run_arguments, run_inference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, required=True,
                   help="DICOM folder (searched recursively) or a folder made by hemorrhage_prepare.py")
    p.add_argument("--output", type=Path, default=Path("predictions.csv"),
                   help="Kaggle-format CSV; the other outputs are written beside it with its name as prefix")
    p.add_argument("--sequence_weights", type=Path, default=None,
                   help="sequence-head checkpoint, or a folder of them (averaged); trained with "
                        "hemorrhage_train_sequence.py (no published weights exist)")
    add_cnn_run_arguments(p)
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(InferConfig, args)
    try:
        summary = run_inference(cfg)
    except UsageError as e:
        logging.getLogger("hemorrhage_infer").error("%s", e)
        return 2
    print(summary.line())
    for note in summary.notes:
        print(f"  NOTE weights: {note}")
    for path, stage, error in summary.failed[:20]:
        print(f"  failed ({stage}) {path}: {error}")
    if len(summary.failed) > 20:
        print(f"  ... and {len(summary.failed) - 20} more in {summary.files['errors']}")
    return 3 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

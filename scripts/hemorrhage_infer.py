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
import sys

from ctcore import schema
from hemorrhage.run.inference import InferConfig, InferSummary, run_inference


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(InferConfig, description=__doc__)


def report(summary: InferSummary, cfg: InferConfig) -> int:
    print(summary.line())
    for note in summary.notes:
        print(f"  NOTE weights: {note}")
    schema.print_capped([f"  failed ({stage}) {path}: {error}" for path, stage, error in summary.failed],
                        summary.files["errors"])
    return 3 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(InferConfig, run_inference, argv, parser=build_parser(), name="hemorrhage_infer",
                           report=report)


if __name__ == "__main__":
    sys.exit(main())

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
and (DICOM input) predictions_manifest.csv; see hemorrhage/inference.py.

Exit status: 0 every file used, 2 unusable weights or input (nothing written), 3 some files could not
be read (listed in predictions_errors.csv; everything else was predicted and written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from hemorrhage.inference import InferConfig, run_inference
from hemorrhage.prepare import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, required=True,
                   help="DICOM folder (searched recursively) or a folder made by hemorrhage_prepare.py")
    p.add_argument("--output", type=Path, default=Path("predictions.csv"),
                   help="Kaggle-format CSV; the other outputs are written beside it with its name as prefix")
    p.add_argument("--weights_dir", type=Path, default=Path("models/2DNet"),
                   help="folder of <architecture>_<size>/model_epoch_best_{fold}.pth")
    p.add_argument("--models", nargs="+", default=None,
                   help="members to use, by architecture or folder name (default: every folder found)")
    p.add_argument("--folds", nargs="+", type=int, default=None,
                   help="folds to use; each must exist (default: the folds found, 0-4 when complete)")
    p.add_argument("--tta", default="0",
                   help="0: none (the original's centre crop); flip: identity, flip, channel reversal, both; "
                        "N: N random passes as the original (it used 10); random:N likewise")
    p.add_argument("--sequence_weights", type=Path, default=None,
                   help="sequence-head checkpoint, or a folder of them (averaged); trained with "
                        "hemorrhage_train_sequence.py (no published weights exist)")
    p.add_argument("--window", default="header",
                   help="DICOM input: header (the slice's own window, first value), fixed (brain 40/80), three "
                        "(brain/subdural/bone as channels), brain, subdural, bone or CENTER/WIDTH")
    p.add_argument("--batch_size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--num_workers", "-j", type=int, default=-1,
                   help="decoding worker processes (-1 = all CPUs, 0 = in this process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                   help="autocast dtype; auto = bf16 on CUDA, none on the CPU")
    p.add_argument("--input_size", nargs="+", default=[],
                   help="model input size: N for every member or MEMBER=N (default: the size in the folder name)")
    p.add_argument("--center_crop", type=float, default=0.8,
                   help="centre crop ratio resized back, as the original's inference (1 = none)")
    p.add_argument("--fix_bits_stored_12", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the community fix to BitsStored-12 / intercept > -100 slices (counted)")
    p.add_argument("--original_int", action="store_true",
                   help="truncate WindowCenter/Width, RescaleSlope/Intercept with int() as the original did")
    p.add_argument("--seed", type=int, default=0, help="seed of the random TTA passes")
    p.add_argument("--no_progress", dest="progress", action="store_false")
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

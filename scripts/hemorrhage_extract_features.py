"""Per-slice features and probabilities of the trained CNNs, the sequence head's input.

    python scripts/hemorrhage_extract_features.py --data_dir /data/dicoms --weights_dir runs/2DNet \\
        --output_dir runs/features --tta 10
    python scripts/hemorrhage_extract_features.py --data_dir /data/test --weights_dir runs/2DNet \\
        --output_dir runs/features_test --folds_csv none

Studies listed in the folds file (default: <weights_dir>/folds.csv, written by hemorrhage_train.py) get
out-of-fold features (the one fold that did not train on them); other studies get every fold's. The
penultimate features are averaged over the TTA passes and stored as float16, one file per series and
fold, with the per-slice probabilities; re-running resumes. See hemorrhage/run/features.py for the layout.

Exit status: 0 every file used, 2 unusable weights, input or settings (nothing written), 3 some files
could not be read (listed in errors.csv; everything else was written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError
from hemorrhage.run.features import ExtractConfig, run_extraction
from hemorrhage.run.inference import add_cnn_run_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, required=True,
                   help="DICOM folder (searched recursively) or a folder made by hemorrhage_prepare.py")
    p.add_argument("--output_dir", type=Path, required=True, help="where features/ and the tables go")
    p.add_argument("--folds_csv", default=None,
                   help="study -> fold (StudyInstanceUID,fold) for out-of-fold features; default "
                        "<weights_dir>/folds.csv when present; 'none': every study gets every fold")
    add_cnn_run_arguments(p)  # the CNN settings are inference's, flag for flag
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(ExtractConfig, args)
    try:
        summary = run_extraction(cfg)
    except UsageError as e:
        logging.getLogger("hemorrhage_extract_features").error("%s", e)
        return 2
    print(summary.line())
    for path, stage, error in summary.failed[:20]:
        print(f"  failed ({stage}) {path}: {error}")
    if len(summary.failed) > 20:
        print(f"  ... and {len(summary.failed) - 20} more in {summary.output_dir / 'errors.csv'}")
    return 3 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

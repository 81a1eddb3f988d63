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
import sys

from ctcore import schema
from hemorrhage.run.features import ExtractConfig, ExtractSummary, run_extraction


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(ExtractConfig, description=__doc__)  # the CNN flags are inference's, flag for flag


def report(summary: ExtractSummary, cfg: ExtractConfig) -> int:
    print(summary.line())
    schema.print_capped([f"  failed ({stage}) {path}: {error}" for path, stage, error in summary.failed],
                        summary.output_dir / "errors.csv")
    return 3 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(ExtractConfig, run_extraction, argv, parser=build_parser(),
                           name="hemorrhage_extract_features", report=report)


if __name__ == "__main__":
    sys.exit(main())

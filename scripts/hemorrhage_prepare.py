"""Head CT DICOM studies -> windowed uint8 slices for the RSNA 2019 models (seed: prepare_custom_data.py).

    python scripts/hemorrhage_prepare.py --input_dir /data/dicoms --output_dir /data/processed
    python scripts/hemorrhage_prepare.py -i /data/dicoms -o /data/processed --format npz --window three -j 16
    python scripts/hemorrhage_prepare.py --config configs/hemorrhage/prepare.yaml -i DICOMS -o OUT

Writes OUT/png/ID_<SOPInstanceUID>.png (or OUT/npz/<SeriesInstanceUID>.npz with --format npz),
OUT/manifest.csv, OUT/errors.csv and OUT/prepare_config.yaml (see hemorrhage/run/prepare.py). Re-running
the same command resumes. Exit status: 0 all slices written, 2 bad input or settings (no such folder,
no DICOM found), 3 some files failed (listed in errors.csv; everything else was written).
"""

from __future__ import annotations

import argparse
import sys

from ctcore import schema
from hemorrhage.run.prepare import PrepareConfig, PrepareSummary, run_prepare


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(PrepareConfig, description=__doc__)


def report(summary: PrepareSummary, cfg: PrepareConfig) -> int:
    print(summary.line())
    schema.print_capped([f"  failed {f.path}: {f.error}" for f in summary.failed], cfg.output_dir / "errors.csv")
    return 3 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(PrepareConfig, run_prepare, argv, parser=build_parser(), name="hemorrhage_prepare",
                           report=report)


if __name__ == "__main__":
    sys.exit(main())

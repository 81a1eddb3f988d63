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
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError
from hemorrhage.run.prepare import FORMATS, PrepareConfig, run_prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", "-i", type=Path, required=True,
                   help="folder searched recursively for DICOM files")
    p.add_argument("--output_dir", "-o", type=Path, required=True,
                   help="folder for png/ or npz/, manifest.csv and errors.csv")
    p.add_argument("--format", choices=FORMATS, default="png",
                   help="png: one image per slice as the original; npz: one uint8 stack per series (faster)")
    p.add_argument("--window", default="header",
                   help="header (the slice's own WindowCenter/Width, first value), three (brain 40/80, "
                        "subdural 80/200, bone 600/2800 as 3 channels), brain, subdural, bone, or "
                        "CENTER/WIDTH e.g. 40/80")
    p.add_argument("--num_workers", "--n_jobs", "-j", dest="num_workers", type=int, default=-1,
                   help="worker processes (-1 = all CPUs, 0 = in this process)")
    p.add_argument("--fix_bits_stored_12", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the community fix to BitsStored-12 / intercept > -100 slices (counted)")
    p.add_argument("--original_int", action="store_true",
                   help="truncate WindowCenter/Width, RescaleSlope/Intercept with int() as the original did")
    p.add_argument("--compress", action="store_true",
                   help="npz: deflate the stacks (about PNG size; slower to write and to load)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove this tool's earlier outputs instead of resuming")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(PrepareConfig, args)
    try:
        summary = run_prepare(cfg)
    except UsageError as e:
        logging.getLogger("hemorrhage_prepare").error("%s", e)
        return 2
    print(summary.line())
    for f in summary.failed[:20]:
        print(f"  failed {f.path}: {f.error}")
    if len(summary.failed) > 20:
        print(f"  ... and {len(summary.failed) - 20} more in {cfg.output_dir / 'errors.csv'}")
    return 3 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Split CT-RATE's validation set by patient into validation and test (seed: split_validation.py).

    python scripts/ctclip_split.py --data_dir data/ct_rate --target_val_size 500 --seed 42

Rewrites validation_metadata.csv, validation_reports.csv, valid_predicted_labels.csv, writes the
test_* files and split_summary.json; the originals are kept as original_validation_*.csv (never
overwritten) and are read by every later run, so running twice gives the same result.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ctclip.data.splits import SplitError
from ctclip.run.split import SplitConfig, split_validation
from ctcore.cli import parse_args, setup_logging, to_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, required=True, help="folder with the CT-RATE validation CSVs")
    p.add_argument("--target_val_size", type=int, default=500, help="volumes wanted on the validation side")
    p.add_argument("--seed", type=int, default=42)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging()
    try:
        summary = split_validation(to_config(SplitConfig, args))
    except (SplitError, OSError) as e:
        logging.getLogger("ctclip_split").error("%s", e)
        return 2
    v, t = summary["validation"], summary["test"]
    print(f"split: validation {v['volumes']} volumes / {v['patients']} patients, "
          f"test {t['volumes']} volumes / {t['patients']} patients (seed {summary['seed']})")
    print(json.dumps(summary["rows_per_file"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

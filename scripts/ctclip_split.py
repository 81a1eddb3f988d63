"""Split CT-RATE's validation set by patient into validation and test (seed: split_validation.py).

    python scripts/ctclip_split.py --data_dir data/ct_rate --target_val_size 500 --seed 42

Rewrites validation_metadata.csv, validation_reports.csv, valid_predicted_labels.csv, writes the
test_* files and split_summary.json; the originals are kept as original_validation_*.csv (never
overwritten) and are read by every later run, so running twice gives the same result.
"""

from __future__ import annotations

import argparse
import json
import sys

from ctclip.data.splits import SplitError
from ctclip.run.split import SplitConfig, split_validation
from ctcore import schema


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(SplitConfig, description=__doc__, verbose=False)


def report(summary: dict, cfg: SplitConfig) -> None:
    v, t = summary["validation"], summary["test"]
    print(f"split: validation {v['volumes']} volumes / {v['patients']} patients, "
          f"test {t['volumes']} volumes / {t['patients']} patients (seed {summary['seed']})")
    print(json.dumps(summary["rows_per_file"]))


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(SplitConfig, split_validation, argv, parser=build_parser(), name="ctclip_split",
                           errors=(SplitError, OSError), report=report)


if __name__ == "__main__":
    sys.exit(main())

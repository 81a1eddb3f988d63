"""Make a synthetic head CT DICOM dataset in the RSNA 2019 format, with planted hemorrhages.

    python scripts/hemorrhage_make_synthetic.py --out_dir data/synth_head --n_studies 20 --size 512 \\
        --slices 32 --seed 0 --broken 2 --montage data/synth_head/montage.png
    python scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml --out_dir /tmp/s

Writes DIR/dicom/... (one file per slice, shuffled names), DIR/labels.csv (Kaggle stage_2_train.csv:
ID,Label), DIR/studies.csv (one row per series), DIR/broken.csv, DIR/truth/ and DIR/config.yaml.
"""

from __future__ import annotations

import argparse

from ctcore import schema
from hemorrhage.synthetic.config import HeadSynthConfig
from hemorrhage.synthetic.montage import HeadMontageConfig, make_head_dataset

CONFIGS = (HeadSynthConfig, HeadMontageConfig)


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(*CONFIGS, description=__doc__, verbose=False)


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(CONFIGS, make_head_dataset, argv, parser=build_parser(), name="hemorrhage_make_synthetic",
                           errors=(ValueError, FileExistsError), report=lambda summary, *_: print(summary.line()))


if __name__ == "__main__":
    raise SystemExit(main())

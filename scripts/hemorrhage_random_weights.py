"""A weights folder in the published layout, filled with randomly initialised models (marked as such).

    python scripts/hemorrhage_random_weights.py --out_dir demo/weights --folds 0
    python scripts/hemorrhage_random_weights.py --out_dir W --models DenseNet121_change_avg=512 --folds 0 1

For trying the inference pipeline end to end before any weights are trained or obtained: every file
carries a note ("randomly initialised ... not trained") that hemorrhage_infer.py prints and records in
its run JSON. Do not read anything into the predictions these weights give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctcore import schema
from hemorrhage.models.random_weights import RandomWeightsConfig, make_random_weights


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(RandomWeightsConfig, description=__doc__, verbose=False)


def report(paths: list[Path], cfg: RandomWeightsConfig) -> None:
    print(f"hemorrhage_random_weights: {len(paths)} randomly initialised checkpoints -> {cfg.out_dir}")


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(RandomWeightsConfig, make_random_weights, argv, parser=build_parser(),
                           name="hemorrhage_random_weights", report=report)


if __name__ == "__main__":
    sys.exit(main())

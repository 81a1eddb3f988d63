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

from ctcore.cli import parse_args
from hemorrhage.models.checkpoint import SEED_ENSEMBLE, save_random_weights
from hemorrhage.models.cnn import cnn_spec


def _member(text: str) -> tuple[str, int]:
    name, _, size = text.rpartition("=")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARCHITECTURE=SIZE, e.g. DenseNet121_change_avg=512")
    try:
        cnn_spec(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, int(size)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, required=True, help="weights folder to create")
    p.add_argument("--models", nargs="+", type=_member, default=list(SEED_ENSEMBLE),
                   help="ARCHITECTURE=SIZE members (default: the published three)")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    paths = save_random_weights(args.out_dir, args.models, args.folds, args.seed)
    print(f"hemorrhage_random_weights: {len(paths)} randomly initialised checkpoints -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

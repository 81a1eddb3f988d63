"""Train the sequence head of one fold on extracted CNN features (seed: the original's SequenceModel).

    python scripts/hemorrhage_train_sequence.py --features_dir runs/features --labels stage_2_train.csv \\
        --output_dir runs/sequence --fold 0
    python scripts/hemorrhage_train_sequence.py --config configs/hemorrhage/sequence_tiny.yaml \\
        --features_dir F --labels L --output_dir O --fold 1 --rnn gru

--features_dir is the --output_dir of hemorrhage_extract_features.py run on the training studies (its
out-of-fold files); --labels the RSNA-format ID,Label CSV. Writes O/sequence_fold{k}.pth (the best
validation epoch, loadable by hemorrhage_infer.py --sequence_weights), O/train_log_{k}.jsonl and
O/sequence_config_{k}.yaml. See hemorrhage/run/train_sequence.py for the recipe.

Exit status: 0 trained, 2 unusable features, labels or settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError
from hemorrhage.run.train_sequence import SequenceTrainConfig, run_sequence_training


def build_parser() -> argparse.ArgumentParser:
    d = SequenceTrainConfig(Path(), Path(), Path())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features_dir", type=Path, required=True, help="output folder of hemorrhage_extract_features.py")
    p.add_argument("--labels", type=Path, required=True, help="RSNA-format labels (ID,Label)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--fold", type=int, default=d.fold, help="validation fold (the CNN training's folds)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="series per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight_decay", type=float, default=d.weight_decay)
    p.add_argument("--milestones", type=int, nargs="*", default=d.milestones, help="MultiStepLR epochs")
    p.add_argument("--gamma", type=float, default=d.gamma, help="MultiStepLR factor")
    p.add_argument("--crop", type=int, default=d.crop, help="consecutive slices per training sample")
    p.add_argument("--every_other", type=float, default=d.every_other,
                   help="probability of keeping every other slice")
    p.add_argument("--reverse", type=float, default=d.reverse, help="probability of reversing the slice order")
    p.add_argument("--rnn", choices=("lstm", "gru"), default=d.rnn, help="lstm (default) or gru (the original's)")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--conv_width", type=int, default=d.conv_width)
    p.add_argument("--use_slice_gap", action="store_true", help="the distance to the next slice as an extra input")
    p.add_argument("--device", default=d.device)
    p.add_argument("--num_workers", type=int, default=d.num_workers, help="DataLoader workers reading features")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no_progress", dest="progress", action="store_false")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(SequenceTrainConfig, args)
    try:
        result = run_sequence_training(cfg)
    except UsageError as e:
        logging.getLogger("hemorrhage_train_sequence").error("%s", e)
        return 2
    print(f"hemorrhage_train_sequence: fold {cfg.fold}, best epoch {result['best_epoch']}: validation weighted "
          f"log loss {result['best_val_loss']:.4f} (CNN ensemble alone {result['cnn_val_loss']:.4f}); "
          f"{result['train_series']} training / {result['val_series']} validation series; "
          f"{result['seconds']:.1f} s -> {result['checkpoint']}")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

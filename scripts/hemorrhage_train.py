"""Train one CNN of the RSNA 2019 first-place ensemble on one fold (seed: 2DNet/src/train.py).

    python scripts/hemorrhage_train.py --labels stage_2_train.csv --data_dir /data/dicoms \\
        --model se_resnext101_32x4d --fold 0 --output_dir runs/2DNet
    python scripts/hemorrhage_train.py --config configs/hemorrhage/train_tiny.yaml --labels L --data_dir D --output_dir O
    torchrun --nproc_per_node=4 scripts/hemorrhage_train.py --use_ddp --labels L --data_dir D --output_dir O --fold 1

--labels is an RSNA-format CSV (ID,Label with ID = <SOPInstanceUID>_<class>); --data_dir a DICOM tree
(prepared once into OUTPUT_DIR/prepared) or a folder made by hemorrhage_prepare.py. The best checkpoint
is OUTPUT_DIR/<model>_<input size>/model_epoch_best_<fold>.pth in the original format, so
`hemorrhage_infer.py --weights_dir OUTPUT_DIR` uses it unchanged. See hemorrhage/run/train_cnn.py.
Exit status: 0 done, 2 bad input or settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError
from ctcore.precision import CHOICES as PRECISION_CHOICES
from hemorrhage.augment import AUGMENT_PRESETS
from hemorrhage.models.cnn import list_cnns
from hemorrhage.run.train_cnn import TrainConfig, run_training


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, required=True, help="RSNA-format labels CSV (ID,Label)")
    p.add_argument("--data_dir", type=Path, required=True, help="DICOM tree or hemorrhage_prepare.py output")
    p.add_argument("--output_dir", type=Path, required=True, help="run folder; also a --weights_dir for inference")
    p.add_argument("--model", default="DenseNet121_change_avg",
                   help=f"architecture: {', '.join(list_cnns())} (tiny_densenet for tests)")
    p.add_argument("--fold", type=int, default=0, help="held-out fold")
    p.add_argument("--n_folds", type=int, default=5)
    p.add_argument("--fold_seed", type=int, default=0, help="seed of the study -> fold assignment (folds.csv)")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight_decay", type=float, default=2e-5)
    p.add_argument("--constant_epochs", type=int, default=10, help="epochs at --lr before the warm restarts")
    p.add_argument("--restart_period", type=int, default=5, help="cosine warm restart period, epochs")
    p.add_argument("--min_lr", type=float, default=1e-5)
    p.add_argument("--input_size", type=int, default=256)
    p.add_argument("--samples_per_study", type=int, default=4, help="draws per training study per epoch")
    p.add_argument("--max_draws", type=int, default=None, help="cap on draws per epoch (quick runs)")
    p.add_argument("--window", default="header", help="window used when preparing a DICOM --data_dir")
    p.add_argument("--augment", default=None, choices=sorted(AUGMENT_PRESETS),
                   help="augmentation preset (default: the model's own: the original's for the published "
                        "architectures, light for tiny_densenet)")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="auto = bf16 on CUDA, fp32 on the CPU; bf16 | fp16 (CUDA) | fp32 (none, off)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: CUDA if available)")
    p.add_argument("--num_workers", "-j", type=int, default=-1, help="DataLoader workers (-1 = all CPUs)")
    p.add_argument("--save_every", type=int, default=5, help="also keep model_epoch_<epoch>_<fold>.pth every N")
    p.add_argument("--val_every", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from <model>_<size>/train_state_<fold>.pt")
    p.add_argument("--use_ddp", action="store_true", help="under torchrun or srun: one process per GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", dest="progress", action="store_false")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    try:
        record = run_training(to_config(TrainConfig, args))
    except UsageError as e:
        logging.getLogger("hemorrhage_train").error("%s", e)
        return 2
    best = record.get("best_val_weighted_log_loss")
    print(f"hemorrhage_train: {args.model} fold {args.fold}: best validation weighted log loss "
          f"{best if best is None else round(best, 5)} (epoch {record.get('best_epoch')}) -> {record['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

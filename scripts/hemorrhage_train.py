"""Train one CNN of the RSNA 2019 first-place ensemble on one fold (seed: 2DNet/src/train.py).

    python scripts/hemorrhage_train.py --labels stage_2_train.csv --data_dir /data/dicoms \\
        --model se_resnext101_32x4d --fold 0 --output_dir runs/2DNet
    python scripts/hemorrhage_train.py --config configs/hemorrhage/train_tiny.yaml --labels L --data_dir D --output_dir O
    torchrun --nproc_per_node=4 scripts/hemorrhage_train.py --use_ddp --labels L --data_dir D --output_dir O --fold 1

--labels is an RSNA-format CSV (ID,Label with ID = <SOPInstanceUID>_<class>); --data_dir a DICOM tree
(prepared once into OUTPUT_DIR/prepared) or a folder made by hemorrhage_prepare.py. The best checkpoint
is OUTPUT_DIR/<model>_<input size>/model_epoch_best_<fold>.pth in the original format, so
`hemorrhage_infer.py --weights_dir OUTPUT_DIR` uses it unchanged. See hemorrhage/run/train_cnn.py.
Exit status: 0 done, 2 bad input or settings, 75 (EX_TEMPFAIL) stopped by SIGTERM or SIGUSR1 after the
current batch, with <model>_<size>/train_state_<fold>.pt saved: run the same command with --resume.
"""

from __future__ import annotations

import argparse
import sys

from ctcore import schema
from ctcore.preemption import EXIT_PREEMPTED
from hemorrhage.run.train_cnn import TrainConfig, run_training


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(TrainConfig, description=__doc__)


def report(record: dict, cfg: TrainConfig) -> int | None:
    best = record.get("best_val_weighted_log_loss")
    if record.get("stopped_by") == "signal":
        print(f"hemorrhage_train: {cfg.model} fold {cfg.fold}: stopped by a signal after batch "
              f"{record['batches_done']} of epoch {record['epoch']}; resume with --resume ({record['resume_state']})")
        return EXIT_PREEMPTED
    print(f"hemorrhage_train: {cfg.model} fold {cfg.fold}: best validation weighted log loss "
          f"{best if best is None else round(best, 5)} (epoch {record.get('best_epoch')}) -> {record['checkpoint']}")


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(TrainConfig, run_training, argv, parser=build_parser(), name="hemorrhage_train",
                           report=report)


if __name__ == "__main__":
    sys.exit(main())

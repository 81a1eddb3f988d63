"""Train the sequence head of one fold on extracted CNN features (seed: the original's SequenceModel).

    python scripts/hemorrhage_train_sequence.py --features_dir runs/features --labels stage_2_train.csv \\
        --output_dir runs/sequence --fold 0
    python scripts/hemorrhage_train_sequence.py --config configs/hemorrhage/sequence_tiny.yaml \\
        --features_dir F --labels L --output_dir O --fold 1 --rnn gru

--features_dir is the --output_dir of hemorrhage_extract_features.py run on the training studies (its
out-of-fold files); --labels the RSNA-format ID,Label CSV. Writes O/sequence_fold{k}.pth (the best
validation epoch, loadable by hemorrhage_infer.py --sequence_weights), O/train_log_{k}.jsonl and
O/sequence_config_{k}.yaml. See hemorrhage/run/train_sequence.py for the recipe.

Exit status: 0 trained, 2 unusable features, labels or settings, 75 (EX_TEMPFAIL) stopped by SIGTERM or
SIGUSR1 after the current batch, with O/sequence_state_{k}.pt saved: run the same command with --resume.
"""

from __future__ import annotations

import argparse
import json
import sys

from ctcore import schema
from ctcore.preemption import EXIT_PREEMPTED
from hemorrhage.run.train_sequence import SequenceTrainConfig, run_sequence_training


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(SequenceTrainConfig, description=__doc__)


def report(result: dict, cfg: SequenceTrainConfig) -> int | None:
    if result.get("stopped_by") == "signal":
        print(f"hemorrhage_train_sequence: fold {cfg.fold}: stopped by a signal after batch {result['batches_done']} "
              f"of epoch {result['epoch']}; resume with --resume ({result['resume_state']})")
        return EXIT_PREEMPTED
    print(f"hemorrhage_train_sequence: fold {cfg.fold}, best epoch {result['best_epoch']}: validation weighted "
          f"log loss {result['best_val_loss']:.4f} (CNN ensemble alone {result['cnn_val_loss']:.4f}); "
          f"{result['train_series']} training / {result['val_series']} validation series; "
          f"{result['seconds']:.1f} s -> {result['checkpoint']}")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(SequenceTrainConfig, run_sequence_training, argv, parser=build_parser(),
                           name="hemorrhage_train_sequence", report=report)


if __name__ == "__main__":
    sys.exit(main())

"""Train the 3D CLIP model (seed: run_train.py).

    # one process (GPU if available, else CPU)
    python scripts/ctclip_train.py --ct_filepath data/train_volumes.h5 \\
        --txt_filepath data/ct_rate/train_reports.csv --batch_size 32 --epochs 40 --output_dir runs/vitb
    # several GPUs on one node
    torchrun --nproc_per_node=4 scripts/ctclip_train.py --use_ddp --ct_filepath ... --txt_filepath ...
    # a tiny model on CPU (tests, demo)
    python scripts/ctclip_train.py --config configs/ctclip/train_tiny.yaml --ct_filepath ... --txt_filepath ...

--batch_size is the global batch of one optimizer step (split over --grad_accum and the processes).
Exit status: 0 done, 2 when the run cannot start (bad inputs, incompatible checkpoint or weights), 75
(EX_TEMPFAIL) stopped by SIGTERM or SIGUSR1 after the current step, with latest.pt saved: run it again
with --resume latest (scripts/slurm/ctclip_train.sbatch requeues itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ctclip.checkpoint import CheckpointError
from ctclip.data.reports import TableError
from ctclip.models.factory import ModelChoice
from ctclip.run.train import SetupError, TrainConfig, train
from ctcore import schema
from ctcore.distributed import read_launch_env
from ctcore.preemption import EXIT_PREEMPTED

CONFIGS = (TrainConfig, ModelChoice)


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(*CONFIGS, description=__doc__)


def run(cfg: TrainConfig, choice: ModelChoice) -> dict:
    return train(dataclasses.replace(cfg, model=choice.resolve()))


def report(summary: dict, cfg: TrainConfig, choice: ModelChoice) -> int | None:
    launch = read_launch_env() if cfg.use_ddp else None
    if launch is None or launch.rank == 0:  # one summary line per run, not one per rank
        print(f"train: {json.dumps(summary)} -> {cfg.output_dir}")
    return EXIT_PREEMPTED if summary.get("stopped_by") == "signal" else None  # every rank: the same status


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(CONFIGS, run, argv, parser=build_parser(), name="ctclip_train", report=report,
                           errors=(SetupError, CheckpointError, TableError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())

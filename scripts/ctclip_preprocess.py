"""CT-RATE NIfTI volumes -> one HDF5 store of uint8 volumes (DESIGN 4.2).

    python scripts/ctclip_preprocess.py --ct_data_path data/ct_rate/volumes/train \\
        --ct_out_path data/train_volumes.h5 --metadata_path data/ct_rate/train_metadata.csv \\
        --target_shape 160 224 224 --num_workers 4

Re-running the same command resumes: complete volumes are skipped, failed or interrupted ones are
redone. Exit status: 0 all volumes done, 3 some failed (listed in the errors CSV), 2 usage error.

One shard of N (a task of a cluster array job, scripts/slurm/ctclip_preprocess.sbatch), written to
data/train_volumes.shard-03-of-16.h5; merge the shard stores with scripts/ctclip_merge_stores.py:

    python scripts/ctclip_preprocess.py --ct_data_path data/ct_rate/volumes/train \\
        --ct_out_path data/train_volumes.h5 --num_shards 16 --shard_index 3

The shard flags are explicit, never read from SLURM variables: SLURM_ARRAY_TASK_COUNT is the number of
tasks submitted, which is not N when only some tasks are re-submitted (--array=3,7).
"""

from __future__ import annotations

import argparse
import sys

from ctclip.run.preprocess import PreprocessConfig, PreprocessSummary, run_preprocess
from ctcore import schema, toolkit_version
from ctcore.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(PreprocessConfig, description=__doc__)


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    return run_preprocess(cfg, version=toolkit_version())


def report(summary: PreprocessSummary, cfg: PreprocessConfig) -> int:
    print(summary.line())
    for name, _, error in summary.failed:
        print(f"  failed {name}: {error}")
    return 3 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(PreprocessConfig, preprocess, argv, parser=build_parser(), name="ctclip_preprocess",
                           errors=(UsageError, ValueError), report=report)


if __name__ == "__main__":
    sys.exit(main())

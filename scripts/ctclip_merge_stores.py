"""Merge the shard stores of a sharded preprocessing run into one HDF5 store (ctclip/data/shards.py).

    python scripts/ctclip_merge_stores.py --stores 'data/train_volumes.shard-*.h5' --out data/train_volumes.h5
    python scripts/ctclip_merge_stores.py --stores 'data/train_volumes.shard-*.h5' --out data/train_volumes.h5 \\
        --mode virtual

--mode copy (default) writes a real store, the same as one unsharded run would have written; it resumes
after an interruption and a re-run copies only what changed. --mode virtual writes a small file of HDF5
virtual datasets that read from the shard stores (no voxel copied; keep the shard stores beside it).
Glob patterns are expanded here, so they can be quoted in a job script that runs before the files exist.

Exit status: 0 merged (volumes that were incomplete or invalid in their shard are skipped and listed in
<out>.skipped.csv); 2 refused, nothing written (stores of different configs or shapes, a VolumeName in
two stores, missing or mixed shards, an unreadable store, an output of another kind or other volumes).
"""

from __future__ import annotations

import argparse
import sys

from ctclip.run.merge_stores import MergeConfig, MergeError, MergeSummary, merge_stores
from ctcore import schema


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(MergeConfig, description=__doc__)


def report(summary: MergeSummary, cfg: MergeConfig) -> None:
    print(summary.line())
    schema.print_capped([f"  skipped {name} ({store}): {why}" for store, name, why in summary.skipped],
                        summary.skipped_csv)


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(MergeConfig, merge_stores, argv, parser=build_parser(), name="ctclip_merge_stores",
                           errors=(MergeError,), report=report)


if __name__ == "__main__":
    sys.exit(main())

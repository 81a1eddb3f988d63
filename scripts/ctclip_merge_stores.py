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
import logging
import sys
from pathlib import Path

from ctclip.data.shards import MODES, MergeConfig, MergeError, merge_stores
from ctcore.cli import parse_args, setup_logging, to_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", nargs="+", required=True,
                   help="the shard stores: files or glob patterns (e.g. 'data/train_volumes.shard-*.h5')")
    p.add_argument("--out", type=Path, required=True, help="the merged store (.h5)")
    p.add_argument("--mode", choices=MODES, default="copy",
                   help="copy: a real store (resumable); virtual: HDF5 virtual datasets into the shard stores")
    p.add_argument("--overwrite", action="store_true", help="rebuild the output instead of resuming it")
    p.add_argument("--allow_missing_shards", action="store_true",
                   help="merge although some shards of the run are missing (their volumes are left out)")
    p.add_argument("--skipped_csv", type=Path, default=None,
                   help="skipped volumes: store, VolumeName, reason (default: <out>.skipped.csv)")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(MergeConfig, args)
    try:
        summary = merge_stores(cfg)
    except MergeError as e:
        logging.getLogger("ctclip_merge_stores").error("%s", e)
        return 2
    print(summary.line())
    for store, name, why in summary.skipped[:20]:
        print(f"  skipped {name} ({store}): {why}")
    if len(summary.skipped) > 20:
        print(f"  ... and {len(summary.skipped) - 20} more in {summary.skipped_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

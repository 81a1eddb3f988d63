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
import logging
import sys
from importlib.metadata import version
from pathlib import Path

from ctclip.run.preprocess import PreprocessConfig, run_preprocess
from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct_data_path", type=Path, required=True, help="folder searched recursively for .nii.gz/.nii")
    p.add_argument("--ct_out_path", type=Path, required=True, help="the HDF5 store to write (.h5)")
    p.add_argument("--metadata_path", type=Path, default=None,
                   help="CT-RATE metadata CSV (VolumeName, RescaleSlope, RescaleIntercept)")
    p.add_argument("--target_shape", type=int, nargs=3, default=[160, 224, 224], metavar=("D", "H", "W"))
    p.add_argument("--num_workers", type=int, default=4,
                   help="worker processes computing volumes (0 = in the main process)")
    p.add_argument("--slide_b2u", action=argparse.BooleanOptionalAction, default=True,
                   help="store slices bottom (inferior) to up (superior)")
    p.add_argument("--layout", choices=["seed", "radiological"], default="seed",
                   help="in-plane layout: seed = rows anterior->posterior, columns patient left->right (the seed's "
                        "stores); radiological = columns patient right->left. Recorded in the store; training and "
                        "evaluation refuse a store whose layout differs from the model's")
    p.add_argument("--quantize", choices=["trunc", "round"], default="trunc",
                   help="HU -> uint8: trunc as the seed does (byte-identical stores), or round to the nearest level")
    p.add_argument("--rescale", choices=["auto", "csv", "none"], default="auto",
                   help="how stored values become HU: auto decides per volume and never applies a scaling twice")
    p.add_argument("--hu_range", type=float, nargs=2, default=[-1000.0, 1000.0], metavar=("LO", "HI"))
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="resample to this voxel size in mm before fitting (e.g. 0.75 0.75 1.5)")
    p.add_argument("--overwrite", action="store_true", help="start a new store instead of resuming")
    p.add_argument("--limit", type=int, default=None, help="only the first N volumes (sorted by name)")
    p.add_argument("--errors_csv", type=Path, default=None,
                   help="default: <ct_out_path>.errors.csv (of the shard store when sharded)")
    p.add_argument("--num_shards", type=int, default=None,
                   help="split the volumes into N shards by a hash of the VolumeName (with --shard_index)")
    p.add_argument("--shard_index", type=int, default=None,
                   help="do shard I (0..N-1) only, into <ct_out_path stem>.shard-<I>-of-<N>.h5 "
                        "(e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    cfg = to_config(PreprocessConfig, args, target_shape=tuple(args.target_shape), hu_range=tuple(args.hu_range),
                    spacing=None if args.spacing is None else tuple(args.spacing))
    try:
        summary = run_preprocess(cfg, version=version("ct-toolkit"))
    except (UsageError, ValueError) as e:
        logging.getLogger("ctclip_preprocess").error("%s", e)
        return 2
    print(summary.line())
    for name, _, error in summary.failed:
        print(f"  failed {name}: {error}")
    return 3 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())

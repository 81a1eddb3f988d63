"""Make a synthetic head CT DICOM dataset in the RSNA 2019 format, with planted hemorrhages.

    python scripts/hemorrhage_make_synthetic.py --out_dir data/synth_head --n_studies 20 --size 512 \\
        --slices 32 --seed 0 --broken 2 --montage data/synth_head/montage.png
    python scripts/hemorrhage_make_synthetic.py --config configs/hemorrhage/synthetic_small.yaml --out_dir /tmp/s

Writes DIR/dicom/... (one file per slice, shuffled names), DIR/labels.csv (Kaggle stage_2_train.csv:
ID,Label), DIR/studies.csv (one row per series), DIR/broken.csv, DIR/truth/ and DIR/config.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from hemorrhage.synthetic.config import HeadSynthConfig
from hemorrhage.synthetic.head import generate_head_dataset
from hemorrhage.synthetic.montage import save_head_montage

HELP = {
    "out_dir": "output folder (must be empty or absent unless --overwrite)",
    "n_studies": "number of studies", "size": "rows = columns of the axial images (e.g. 512 or 128)",
    "slices": "slices of the thick series per study (at most; see --slices_jitter)", "seed": "random seed",
    "broken": "number of deliberately broken files (truncated / no pixel data), listed in broken.csv",
    "slice_mm": "spacing and thickness of the thick series, mm", "thin_mm": "same for the thin series, mm",
    "thin_share": "share of studies with a second, thin series",
    "slices_jitter": "a study has between slices*(1-jitter) and slices thick slices",
    "fov_min_mm": "smallest in-plane field of view, mm", "fov_max_mm": "largest in-plane field of view, mm",
    "normal_share": "share of studies without hemorrhage",
    "j2k_share": "share of series stored as JPEG 2000 lossless", "rle_share": "share stored as RLE lossless",
    "multi_window_share": "share of series with multi-valued WindowCenter/WindowWidth",
    "quirk_share": "share of series with the BitsStored-12 / intercept-0 quirk",
    "localizer_share": "share of studies with a localizer image (0 = none)",
    "tilt_share": "share of series with gantry tilt", "uid_style": "dicom (proper UIDs) or rsna (ID_ + hex)",
    "min_label_mm2": "planted area on a slice from which the slice is labelled, mm^2",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(HeadSynthConfig):
        if f.name == "overwrite":
            continue
        flag = f"--{f.name}"
        if f.name == "out_dir":
            p.add_argument(flag, type=Path, required=True, help=HELP[f.name])
        elif f.name.startswith("p_"):
            p.add_argument(flag, type=float, default=f.default,
                           help=f"probability of {f.name[2:]} in a study that is not normal")
        elif f.name == "uid_style":
            p.add_argument(flag, choices=("dicom", "rsna"), default=f.default, help=HELP[f.name])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=HELP[f.name])
    p.add_argument("--overwrite", action="store_true", help="replace the synthetic dataset already in out_dir")
    p.add_argument("--montage", type=Path, default=None, help="also draw a PNG of a few planted bleeds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging()
    log = logging.getLogger("hemorrhage_make_synthetic")
    cfg = to_config(HeadSynthConfig, args)
    try:
        summary = generate_head_dataset(cfg)
    except (ValueError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    if args.montage is not None:
        save_head_montage(cfg.out_dir, args.montage)
        log.info("montage: %s", args.montage)
    print(summary.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Make a synthetic chest CT set in the CT-RATE layout (real anatomy, planted findings, reports).

    python scripts/ctclip_make_synthetic.py --out_dir data/ct_rate --n_patients 20 --size 512 512 \\
        --slices 128 --seed 0 --variant raw
    python scripts/ctclip_make_synthetic.py --config configs/ctclip/synthetic_small.yaml \\
        --out_dir /tmp/ct_rate --overwrite --montage /tmp/ct_rate.png

Writes DIR/volumes/{train,valid}/..., the six CT-RATE CSVs, DIR/masks/<VolumeName> (bit k = finding k)
and DIR/synthetic_info.json; see ctclip/synthetic/chest.py.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ctclip.synthetic.chest import generate_chest_dataset
from ctclip.synthetic.config import ORIENTATIONS, VARIANTS, ChestSynthConfig
from ctcore.cli import parse_args, setup_logging, to_config


def build_parser() -> argparse.ArgumentParser:
    d = ChestSynthConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", type=Path, default=None, help="output folder (CT-RATE layout)")
    p.add_argument("--n_patients", type=int, default=d.n_patients)
    p.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), default=list(d.size), help="rows and columns"
    )
    p.add_argument("--slices", type=int, default=d.slices, help="slices per volume (D)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=d.variant,
        help="raw: stored = HU - RescaleIntercept (apply the CSV); hu: stored values are HU already",
    )
    p.add_argument(
        "--valid_fraction", type=float, default=d.valid_fraction, help="share of patients in valid"
    )
    p.add_argument(
        "--scans_per_patient", type=int, nargs=2, metavar=("MIN", "MAX"), default=list(d.scans_per_patient)
    )
    p.add_argument(
        "--recons_per_scan", type=int, nargs=2, metavar=("MIN", "MAX"), default=list(d.recons_per_scan)
    )
    p.add_argument(
        "--prevalence",
        nargs="+",
        default=None,
        metavar="NAME=P",
        help="per-finding prevalence, e.g. 'Lung nodule=0.5' 'Emphysema=0.2' (YAML: a mapping)",
    )
    p.add_argument(
        "--default_prevalence",
        type=float,
        default=d.default_prevalence,
        help="prevalence of every plantable finding not named in --prevalence",
    )
    p.add_argument(
        "--empty_impression_rate",
        type=float,
        default=d.empty_impression_rate,
        help="share of reports without impression (half NaN, half 'Not given.')",
    )
    p.add_argument(
        "--intercept_8192_rate",
        type=float,
        default=d.intercept_8192_rate,
        help="share of scans whose metadata lists RescaleIntercept -8192 (else -1024)",
    )
    p.add_argument("--noise_hu", type=float, nargs=2, metavar=("MIN", "MAX"), default=list(d.noise_hu))
    p.add_argument(
        "--orientations",
        nargs="+",
        choices=ORIENTATIONS,
        default=list(d.orientations),
        help="on-disk axis orientations to draw from (the affine is always correct)",
    )
    p.add_argument("--samples_dir", type=Path, default=None, help="sample data cache (default: ctcore's)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the synthetic data in a non-empty out_dir"
    )
    p.add_argument("--montage", type=Path, default=None, help="also save a PNG of planted findings here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.out_dir is None:
        parser.error("--out_dir is required (on the command line or in --config)")
    setup_logging()
    try:
        cfg = to_config(ChestSynthConfig, args, prevalence=args.prevalence or {})
        cfg.validate()
        summary = generate_chest_dataset(cfg)
    except ValueError as e:
        parser.error(str(e))
    if args.montage is not None:
        from ctclip.synthetic.montage import save_chest_montage

        logging.getLogger("ctclip_make_synthetic").info(
            "montage: %s", save_chest_montage(cfg.out_dir, args.montage)
        )
    print(summary.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

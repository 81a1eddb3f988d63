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

from ctclip.synthetic.config import ChestSynthConfig
from ctclip.synthetic.montage import ChestMontageConfig, make_chest_dataset
from ctcore import schema

CONFIGS = (ChestSynthConfig, ChestMontageConfig)


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(*CONFIGS, description=__doc__, verbose=False)


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(CONFIGS, make_chest_dataset, argv, parser=build_parser(), name="ctclip_make_synthetic",
                           usage_errors=(ValueError,), report=lambda summary, *_: print(summary.line()))


if __name__ == "__main__":
    raise SystemExit(main())

"""Learning benchmark, chest half (benchmarks/bench_learning_ctclip.py): building its data set (synthetic
CT-RATE set -> preprocessed stores -> validation/test split by patient), the checks that refuse settings
which would leave a side empty, and the step timer.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def import_scripts() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


class Timer:
    """Wall and CPU seconds of a block, this process and its finished children (preprocess workers)."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = self._cpu() - self.cpu0

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2)}


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed (exit {rc})")


def build_data(args: argparse.Namespace, data: Path, timings: dict) -> dict[str, Any]:
    """Synthetic set -> preprocessed train/valid stores -> validation/test split by patient."""
    import_scripts()
    from scripts.ctclip_make_synthetic import main as make
    from scripts.ctclip_preprocess import main as preprocess
    from scripts.ctclip_split import main as split

    argv = ["--config", str(args.ctclip_synth_config), "--out_dir", str(data), "--overwrite",
            "--seed", str(args.ctclip_seed)]
    if args.ctclip_n_patients is not None:
        argv += ["--n_patients", str(args.ctclip_n_patients)]
    with Timer() as t:
        _check(make(argv), "ctclip_make_synthetic")
    timings["synthesize"] = t.as_dict()
    with Timer() as t:
        for side, meta in (("train", "train_metadata.csv"), ("valid", "validation_metadata.csv")):
            _check(preprocess(["--config", str(args.ctclip_preprocess_config), "--overwrite",
                               "--ct_data_path", str(data / "volumes" / side),
                               "--ct_out_path", str(data / f"{side}_volumes.h5"),
                               "--metadata_path", str(data / meta)]), f"ctclip_preprocess ({side})")
    timings["preprocess"] = t.as_dict()
    with Timer() as t:
        _check(split(["--data_dir", str(data), "--target_val_size", str(args.ctclip_val_volumes), "--seed", "42"]),
               "ctclip_split")
    timings["split"] = t.as_dict()
    return json.loads((data / "split_summary.json").read_text())


class SetupError(ValueError):
    """Settings that cannot give a result; raised before any work."""


def check_sides(args: argparse.Namespace) -> None:
    """Refuse a set whose valid patients cannot fill the validation side and still leave a test side: the
    validation side takes whole patients until it holds --ctclip_val_volumes volumes, so in the worst case
    (one volume per patient) that many patients."""
    import yaml

    synth = yaml.safe_load(Path(args.ctclip_synth_config).read_text()) or {}
    n = args.ctclip_n_patients if args.ctclip_n_patients is not None else int(synth.get("n_patients", 0))
    fraction = float(synth.get("valid_fraction", 0.25))
    valid = round(n * fraction)
    if valid - args.ctclip_val_volumes < 1:
        need = int((args.ctclip_val_volumes + 1) / fraction) + 1 if fraction > 0 else None
        raise SetupError(
            f"{n} patients x valid_fraction {fraction:g} = {valid} valid patients, and the validation side takes up "
            f"to {args.ctclip_val_volumes} of them (--ctclip_val_volumes): no test side would be left. Give at least "
            f"{need} patients (--ctclip_n_patients) or a smaller --ctclip_val_volumes.")


def check_split(split: dict, data: Path) -> None:
    sizes = {side: int((split.get(side) or {}).get("volumes", 0)) for side in ("validation", "test")}
    empty = [side for side, n in sizes.items() if n == 0]
    if empty:
        raise SetupError(f"{data / 'split_summary.json'}: the {' and '.join(empty)} side has no volume "
                         f"(validation {sizes['validation']}, test {sizes['test']} volumes); more patients or a "
                         "smaller --ctclip_val_volumes")

"""Synthetic chest CT in the CT-RATE layout, built on a real contrast chest CT and its organ labels.

    python scripts/ctclip_make_synthetic.py --out_dir data/ct_rate --n_patients 20 --size 512 512 \\
        --slices 128 --seed 0 --variant hu
    python scripts/ctclip_make_synthetic.py --config configs/ctclip/synthetic_small.yaml --out_dir /tmp/ct

Each patient gets 1-2 scans (a, b) and each scan 1-3 reconstructions (1, 2, 3). A scan is the real
sample volume under a small random rotation, scale, shift and z-crop, resampled to the requested grid
(the honest voxel size follows from the field of view), with findings planted by
`ctclip.synthetic.planters`. Reconstructions of a scan share anatomy and findings and differ in
kernel, noise and slice profile. Outputs follow `data/ct_rate` of the original project:

    DIR/volumes/{train,valid}/<split>_<pid>/<split>_<pid>_<scan>/<split>_<pid>_<scan>_<recon>.nii.gz
    DIR/{train,validation}_metadata.csv  DIR/{train,validation}_reports.csv
    DIR/{train,valid}_predicted_labels.csv
    DIR/masks/<VolumeName>      uint32, bit k set where FINDINGS[k] was planted (same grid and affine)
    DIR/synthetic_info.json     config, storage variant, per-volume planted findings, timing

Storage variants (the CT-RATE pitfall, DESIGN.md 4.1): the metadata always lists RescaleSlope 1 and
RescaleIntercept -1024 or -8192. `raw` stores HU - intercept (apply the CSV to get HU); `hu` stores
HU already, as the current CT-RATE release does. The NIfTI's own scaling is left unset in both.

This module plans patients and scans and writes the whole set; the pieces live beside it:
`synthetic_config` (settings), `synthetic_anatomy` (the real base CT), `synthetic_geometry` (pose,
grid, resampling), `synthetic_volume` (planting and reconstruction in memory), `synthetic_io` (files),
`synthetic_reports` (report text, written as CT-RATE writes it), `synthetic_metadata` (metadata rows).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctclip.findings import FINDINGS, LABEL_COLUMNS
from ctclip.synthetic.anatomy import ChestBase, load_chest_base
from ctclip.synthetic.config import ChestSynthConfig
from ctclip.synthetic.files import (
    SPLITS,
    load_finding_masks,
    prepare_out_dir,
    write_csv,
    write_info,
    write_volume,
)
from ctclip.synthetic.geometry import draw_geometry
from ctclip.synthetic.metadata import METADATA_COLUMNS, draw_scanner, metadata_row
from ctclip.synthetic.planters import PLANTABLE, PLANTERS
from ctclip.synthetic.reports import REPORT_COLUMNS, compose_report
from ctclip.synthetic.volume import ScanSpec, draw_recon, keyed_rng, reconstruct, synthesize_scan

# load_finding_masks is re-exported: docs/ctclip.md points users at ctclip.data.synthetic.load_finding_masks
__all__ = [
    "ChestSynthConfig",
    "ScanPlan",
    "SynthSummary",
    "assign_splits",
    "generate_chest_dataset",
    "load_finding_masks",
    "plan_patient",
    "write_patient",
]

log = logging.getLogger(__name__)


@dataclass
class SynthSummary:
    out_dir: Path
    volumes: dict[str, int]
    patients: dict[str, int]
    positives: dict[str, int]  # volumes with the finding, both splits
    seconds: float

    def line(self) -> str:
        pos = ", ".join(f"{k}: {v}" for k, v in self.positives.items() if v)
        return (
            f"wrote {self.volumes['train']} train / {self.volumes['valid']} valid volumes "
            f"({self.patients['train']} / {self.patients['valid']} patients) to {self.out_dir} in "
            f"{self.seconds:.1f} s; positives: {pos or 'none'}"
        )


def assign_splits(cfg: ChestSynthConfig) -> list[tuple[str, int]]:
    """(split, patient id) per patient; ids count from 1 within each split."""
    n = cfg.n_patients
    n_valid = round(n * cfg.valid_fraction)
    if n >= 2 and 0 < cfg.valid_fraction < 1:
        n_valid = min(max(n_valid, 1), n - 1)
    valid = set(keyed_rng(cfg.seed, 0).permutation(n)[:n_valid].tolist())
    counters = {"train": 0, "valid": 0}
    out = []
    for g in range(n):
        split = "valid" if g in valid else "train"
        counters[split] += 1
        out.append((split, counters[split]))
    return out


def _scan_findings(
    cfg: ChestSynthConfig, present: list[str], scan_index: int, rng: np.random.Generator
) -> list[str]:
    """A later scan keeps most of the patient's findings and rarely gains one."""
    keep = rng.random(len(PLANTABLE)) < cfg.scan_keep_rate
    new = rng.random(len(PLANTABLE))
    if scan_index == 0:
        return present
    return [
        n
        for i, n in enumerate(PLANTABLE)
        if (n in present and keep[i])
        or (n not in present and new[i] < cfg.prevalence_of(n) * (1 - cfg.scan_keep_rate))
    ]


@dataclass(frozen=True)
class ScanPlan:
    """Everything drawn for one scan before anything is planted (so later draws never depend on planting)."""

    letter: str
    spec: ScanSpec
    scanner: dict
    intercept: int
    study_date: dt.date
    n_recons: int


def plan_patient(cfg: ChestSynthConfig, base: ChestBase, g: int) -> tuple[dict, list[ScanPlan]]:
    """Patient `g` (0-based over the whole set): demographics and its scans, from its own random stream."""
    prng = keyed_rng(cfg.seed, 1, g)
    present = [n for n in PLANTABLE if prng.random() < cfg.prevalence_of(n)]
    params = {n: PLANTERS[n].draw(prng, base.sites) for n in PLANTABLE}
    patient = {"sex": str(prng.choice(["M", "F"])), "age": int(prng.integers(25, 90))}
    date = dt.date(2019, 1, 1) + dt.timedelta(days=int(prng.integers(0, 1200)))
    scans = []
    for si in range(int(prng.integers(cfg.scans_per_patient[0], cfg.scans_per_patient[1] + 1))):
        srng = keyed_rng(cfg.seed, 2, g, si)
        names = _scan_findings(cfg, present, si, srng)
        spec = ScanSpec(
            geometry=draw_geometry(cfg, base, srng),
            findings={n: params[n] for n in names},
            seed=int(srng.integers(2**63)),
        )
        date += dt.timedelta(days=int(srng.integers(30, 400)) if si else 0)
        scans.append(
            ScanPlan(
                letter=chr(ord("a") + si),
                spec=spec,
                scanner=draw_scanner(srng),
                intercept=-8192 if srng.random() < cfg.intercept_8192_rate else -1024,
                study_date=date,
                n_recons=int(srng.integers(cfg.recons_per_scan[0], cfg.recons_per_scan[1] + 1)),
            )
        )
    return patient, scans


VolumeRows = tuple[str, dict, dict, dict, dict]  # split, metadata row, report row, label row, info entry


def write_patient(cfg: ChestSynthConfig, base: ChestBase, g: int, split: str, pid: int) -> list[VolumeRows]:
    """Synthesize patient `g` (0-based over the set; `pid` within its split), write its volumes and masks,
    and return their table rows. Everything comes from the patient's own random streams, so the result
    does not depend on which process runs it or in what order."""
    shape = (cfg.size[1], cfg.size[0], cfg.slices)
    patient, scans = plan_patient(cfg, base, g)
    out: list[VolumeRows] = []
    for sp in scans:
        planted = synthesize_scan(base, sp.spec, shape)
        report = compose_report(
            planted.details,
            keyed_rng(cfg.seed, 4, g, ord(sp.letter)),
            z_spacing=float(planted.grid.spacing[2]),
            empty_impression_rate=cfg.empty_impression_rate,
        )
        for ri in range(sp.n_recons):
            tv = time.perf_counter()
            vrng = keyed_rng(cfg.seed, 3, g, ord(sp.letter), ri)
            code = str(vrng.choice(cfg.orientations))
            vol = reconstruct(planted, draw_recon(cfg, ri, vrng), vrng)
            name = f"{split}_{pid}_{sp.letter}_{ri + 1}.nii.gz"
            affine, disk_shape = write_volume(cfg, name, vol, sp.intercept, code)
            meta = metadata_row(
                name, patient, sp.scanner, vol.recon.kernel, affine, disk_shape, sp.intercept, sp.study_date
            )
            info = {
                "VolumeName": name,
                "orientation": code,
                "RescaleIntercept": sp.intercept,
                "planted": vol.details,
                "recon": vol.recon.__dict__,
                "seconds": round(time.perf_counter() - tv, 3),
            }
            out.append((split, meta, {"VolumeName": name, **report}, {"VolumeName": name, **vol.labels}, info))
    return out


# a worker process's copy of the set's settings and base CT (set once by _worker_init)
_WORKER: dict = {}


def _worker_init(cfg: ChestSynthConfig, base: ChestBase) -> None:
    _WORKER.update(cfg=cfg, base=base)


def _worker_patient(item: tuple[int, str, int]) -> list[VolumeRows]:
    return write_patient(_WORKER["cfg"], _WORKER["base"], *item)


def _patients(cfg: ChestSynthConfig, base: ChestBase, plan: list[tuple[str, int]]) -> Iterator[list[VolumeRows]]:
    """write_patient over the plan, in plan order, in this process or in cfg.num_workers processes."""
    items = [(g, split, pid) for g, (split, pid) in enumerate(plan)]
    if cfg.num_workers <= 0 or len(items) < 2:
        yield from (write_patient(cfg, base, *it) for it in items)
        return
    # spawn-like start (no fork of a process that may hold threads); each worker gets the base CT once
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    workers = min(cfg.num_workers, len(items))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init,
                             initargs=(cfg, base)) as pool:
        yield from pool.map(_worker_patient, items, chunksize=max(1, min(8, len(items) // (4 * workers))))


def generate_chest_dataset(cfg: ChestSynthConfig) -> SynthSummary:
    """Write the whole synthetic CT-RATE set described by `cfg` and return a summary."""
    from tqdm import tqdm

    cfg.validate()
    t0 = time.perf_counter()
    prepare_out_dir(cfg)
    base = load_chest_base(cfg.size, cfg.slices, cfg.samples_dir)
    tables: dict[str, dict[str, list]] = {s: {"metadata": [], "reports": [], "labels": []} for s in SPLITS}
    info_volumes: list[dict] = []
    plan = assign_splits(cfg)
    for rows in tqdm(_patients(cfg, base, plan), total=len(plan), desc="patients", unit="patient",
                     disable=len(plan) < 4):
        for split, meta, report, labels, info in rows:
            t = tables[split]
            t["metadata"].append(meta)
            t["reports"].append(report)
            t["labels"].append(labels)
            info_volumes.append(info)
    for split, (meta_f, rep_f, lab_f) in SPLITS.items():
        t = tables[split]
        write_csv(pd.DataFrame(t["metadata"], columns=list(METADATA_COLUMNS)), cfg.out_dir / meta_f)
        write_csv(pd.DataFrame(t["reports"], columns=list(REPORT_COLUMNS)), cfg.out_dir / rep_f)
        write_csv(pd.DataFrame(t["labels"], columns=list(LABEL_COLUMNS)), cfg.out_dir / lab_f)
    summary = SynthSummary(
        out_dir=cfg.out_dir,
        volumes={s: len(tables[s]["labels"]) for s in SPLITS},
        patients={s: sum(1 for sp, _ in plan if sp == s) for s in SPLITS},
        positives={n: sum(int(r[n]) for s in SPLITS for r in tables[s]["labels"]) for n in FINDINGS},
        seconds=time.perf_counter() - t0,
    )
    write_info(cfg, base.source, info_volumes, summary.seconds)
    log.debug("%s", summary.line())
    return summary

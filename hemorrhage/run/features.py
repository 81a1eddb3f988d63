"""Per-slice CNN features and probabilities for the sequence head (scripts/hemorrhage_extract_features.py).

    python scripts/hemorrhage_extract_features.py --data_dir /data/dicoms --weights_dir runs/2DNet \\
        --output_dir runs/features --tta 10
    python scripts/hemorrhage_extract_features.py --data_dir /data/test_dicoms --weights_dir runs/2DNet \\
        --output_dir runs/features_test --folds_csv none

Out of fold: a study listed in the folds file (default: ``<weights_dir>/folds.csv``, which
hemorrhage_train.py writes) gets the features of the one CNN fold that did NOT train on it, so the
sequence head learns from features like those it will meet on new studies. Any other study (a test
set) gets the features of every fold, as inference computes them: the head then runs once per fold.
Each fold's CNNs are loaded once and see only the series that need that fold. Features are averaged
over the TTA passes (as the original's feature files were) and never over folds, whose CNNs have
different feature spaces.

Layout of --output_dir:

    features/fold{k}/<series>.npz   one file per (series, CNN fold); see `hemorrhage.feature_files`
    features_index.csv              one row per file: study, series, fold, role (oof | test), slices, path
    per_slice_probs.csv             one row per (slice, fold, member): study, series, SOP, slice_index,
                                    position, fold, role, member, the six probabilities
    extract_config.yaml             the settings; a resumed run must use the same ones
    extract_run.json                members, weight checksums, counts, versions, timings
    errors.csv, manifest.csv        files that could not be used; DICOM input: every file's series and order

Resumable: a series file is written through a temporary name (ctcore.atomic), and skipped on a re-run
when it exists, reads back, and was made by the same weight files (sha256); a retrained fold is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ctcore.atomic import atomic_write
from ctcore.cli import resolved, save_resolved
from ctcore.errors import UsageError
from ctcore.schema import arg
from hemorrhage.classes import CLASSES
from hemorrhage.cnn_run import (
    CNNRunConfig,
    check_inputs,
    describe_inputs,
    library_versions,
    parse_input_sizes,
)
from hemorrhage.ensemble import CNNEnsemble
from hemorrhage.feature_files import (
    FEATURES_FORMAT,
    FeaturesError,
    SeriesFeatures,
    features_files,
    read_series_features,
    write_series_features,
)
from hemorrhage.inference_data import InputError, SeriesJob, find_series
from hemorrhage.inputs import InputSettings
from hemorrhage.models.checkpoint import ModelWeights, WeightsInventory
from hemorrhage.models.sequence_checkpoint import Member, member_label
from hemorrhage.series import write_manifest
from hemorrhage.streaming import SeriesOutput, stream_series

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.csv"
# settings that change the features: a resumed run must match them
SAME_ON_RESUME = ("weights_dir", "models", "tta", "window", "input_size", "center_crop", "fix_bits_stored_12",
                  "original_int", "seed")


@dataclass
class ExtractConfig(CNNRunConfig):
    output_dir: Path = arg(Path("features"), required=True, help="where features/ and the tables go")
    # study -> fold; None = <weights_dir>/folds.csv if present; "none" = no OOF
    folds_csv: str | None = arg(None, help="study -> fold (StudyInstanceUID,fold) for out-of-fold features; "
                                           "default <weights_dir>/folds.csv when present; 'none': every study "
                                           "gets every fold")


@dataclass
class ExtractSummary:
    output_dir: Path
    n_series: int = 0
    written: int = 0  # (series, fold) files written by this run
    done_before: int = 0  # already complete
    n_slices: int = 0  # slices predicted by this run (every fold counted)
    folds: list[int] = field(default_factory=list)
    oof_studies: int = 0
    test_studies: int = 0
    no_weights: list[str] = field(default_factory=list)  # studies whose fold has no weights
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"hemorrhage_extract_features: {self.n_series} series ({self.oof_studies} studies out of fold, "
                f"{self.test_studies} test studies), CNN folds {self.folds}: {self.written} files written, "
                f"{self.done_before} already done, {len(self.no_weights)} studies without weights for their fold, "
                f"{len(self.failed)} files failed; {self.n_slices} slices in {self.seconds:.1f} s -> {self.output_dir}")


# ----------------------------------------------------------------------------------------- folds


def read_folds_file(path: Path) -> dict[str, int]:
    """study -> fold from a folds.csv (columns StudyInstanceUID, fold), with errors that name the row."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas raises several types on damaged CSVs
        raise UsageError(f"{path}: cannot read the folds file ({type(e).__name__}: {e})") from e
    missing = {"StudyInstanceUID", "fold"} - set(df.columns)
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    out: dict[str, int] = {}
    for row, (study, fold) in enumerate(zip(df["StudyInstanceUID"], df["fold"]), start=2):
        if not study or not fold.strip().isdigit():
            raise UsageError(f"{path} line {row}: expected a study UID and a fold number, got {study!r}, {fold!r}")
        out[study] = int(fold)
    return out


def resolve_folds_file(cfg: ExtractConfig) -> Path | None:
    if cfg.folds_csv is None:
        default = Path(cfg.weights_dir) / FOLDS_FILE
        return default if default.is_file() else None
    if str(cfg.folds_csv).lower() == "none":
        return None
    path = Path(cfg.folds_csv)
    if not path.is_file():
        raise UsageError(f"--folds_csv {path}: no such file")
    return path


def fold_inventory(inv: WeightsInventory, fold: int) -> WeightsInventory:
    """The inventory restricted to one fold's files."""
    return WeightsInventory(inv.root, [ModelWeights(m.name, m.image_size, m.folder,
                                                    [f for f in m.files if f.fold == fold]) for m in inv.models])


def common_folds(inv: WeightsInventory) -> list[int]:
    """Folds every member has: the sequence head needs all members' features for each series."""
    return sorted(set.intersection(*(set(m.folds) for m in inv.models))) if inv.models else []


_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def series_file_names(jobs: list[SeriesJob]) -> list[str]:
    """File stem per job: the SeriesInstanceUID, with the study's UID in front when two studies share it."""
    def safe(text: str) -> str:
        return text if _SAFE.match(text) else hashlib.sha1(text.encode()).hexdigest()

    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.series_uid] = counts.get(j.series_uid, 0) + 1
    return [safe(j.series_uid if counts[j.series_uid] == 1 else f"{j.study_uid}_{j.series_uid}") for j in jobs]


# ----------------------------------------------------------------------------------------- the run


def _check_resume(cfg: ExtractConfig, out: Path) -> None:
    saved = out / "extract_config.yaml"
    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    now = resolved(cfg)
    diff = [k for k in SAME_ON_RESUME if before.get(k) != now.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in diff)
        raise UsageError(f"{out} holds features made with other settings ({detail}); use a new --output_dir "
                         "or the same settings")


def _is_done(path: Path, shas: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        return read_series_features(path).weights_sha256 == shas
    except FeaturesError as e:
        log.warning("%s; it is made again", e)
        return False


def _series_features(out: SeriesOutput, fold: int, role: str, members: list[Member], labels: list[str],
                     shas: list[str], inputs: dict) -> SeriesFeatures:
    job, kept = out.job, out.kept
    return SeriesFeatures(
        job.study_uid, job.series_uid, fold, role, [job.sop_uids[k] for k in kept.tolist()], kept.astype(np.int32),
        np.array([job.positions[k] for k in kept.tolist()], np.float64), members,
        [out.features[lb][:, 0].astype(np.float16) for lb in labels],
        [out.probs[lb][:, 0].astype(np.float32) for lb in labels], shas, inputs)


@dataclass
class _Extraction:
    """What every fold of one extraction run shares (settings, the output folder, the running totals)."""

    cfg: ExtractConfig
    out_dir: Path
    study_fold: dict[str, int]  # study -> the fold that did not train on it (empty: no folds file)
    stem: dict[tuple[str, str], str]  # (study, series) -> file stem
    members: list[Member]
    labels: list[str]
    settings: InputSettings
    inputs: dict
    device: torch.device
    amp: torch.dtype | None
    sizes: dict[str, int]
    flip_tta: bool
    summary: ExtractSummary
    timing: dict[str, float]
    seen_failed: set[str]  # paths already in summary.failed: a file fails the same way in every fold

    def path(self, fold: int, job: SeriesJob) -> Path:
        return self.out_dir / "features" / f"fold{fold}" / f"{self.stem[job.study_uid, job.series_uid]}.npz"


def _usable_folds(inv: WeightsInventory, weights_dir: Path) -> list[int]:
    """The folds every member has (the others are named in a warning); UsageError when there is none."""
    folds = common_folds(inv)
    partial = sorted({f for m in inv.models for f in m.folds} - set(folds))
    if partial:
        log.warning("folds %s are left out: not every member has them (the head needs every member)", partial)
    if not folds:
        raise UsageError(f"{weights_dir}: the members share no fold: "
                         f"{ {member_label((m.name, m.image_size)): m.folds for m in inv.models} }")
    return folds


def _count_studies(summary: ExtractSummary, jobs: list[SeriesJob], study_fold: dict[str, int]) -> None:
    """Out-of-fold and test studies, and the studies whose fold has no weights (warned about)."""
    studies = {j.study_uid for j in jobs}
    summary.oof_studies = len(studies & set(study_fold))
    summary.test_studies = len(studies - set(study_fold))
    summary.no_weights = sorted(s for s in studies & set(study_fold) if study_fold[s] not in summary.folds)
    if summary.no_weights:
        log.warning("%d studies belong to folds without weights %s: no features for them (e.g. %s)",
                    len(summary.no_weights), sorted({study_fold[s] for s in summary.no_weights}),
                    summary.no_weights[0])


def _extract_fold(x: _Extraction, inv: WeightsInventory, fold: int, jobs: list[SeriesJob]) -> None:
    """One CNN fold over the series that need its features and have no complete file of them yet."""
    inv_k = fold_inventory(inv, fold)
    shas = [m.files[0].sha256 for m in inv_k.models]
    todo = []
    for j in jobs:
        assigned = x.study_fold.get(j.study_uid)
        if assigned is not None and assigned != fold:
            continue
        if _is_done(x.path(fold, j), shas):
            x.summary.done_before += 1
        else:
            todo.append(j)
    if not todo:
        return
    t = time.perf_counter()
    ens = CNNEnsemble.load(inv_k, x.device, x.amp, input_sizes=x.sizes, flip_tta=x.flip_tta)
    x.timing["load_models"] += time.perf_counter() - t
    failed: list[tuple[str, str, str]] = []
    for res in stream_series(todo, x.settings, ens, batch_size=x.cfg.batch_size, num_workers=x.cfg.num_workers,
                             want_features=True, progress=x.cfg.progress, failed=failed, timing=x.timing):
        t = time.perf_counter()
        role = "oof" if res.job.study_uid in x.study_fold else "test"
        sf = _series_features(res, fold, role, x.members, x.labels, shas, x.inputs)
        write_series_features(x.path(fold, res.job), sf)
        x.summary.written += 1
        x.summary.n_slices += sf.n_slices
        x.timing["write"] += time.perf_counter() - t
    for e in failed:  # a file fails the same way in every fold: report it once
        if e[0] not in x.seen_failed:
            x.seen_failed.add(e[0])
            x.summary.failed.append(e)


def _write_run_record(x: _Extraction, inv: WeightsInventory, folds_path: Path | None, n_index: int) -> None:
    summary = x.summary
    record = {"config": resolved(x.cfg), "format": FEATURES_FORMAT, "folds_file": str(folds_path or ""),
              "members": [{"member": member_label((m.name, m.image_size)),
                           "folds": [{"fold": f.fold, "path": str(f.path), "sha256": f.sha256} for f in m.files]}
                          for m in inv.models],
              "cnn_folds": summary.folds, "inputs": x.inputs, "series": summary.n_series,
              "files_written": summary.written, "files_done_before": summary.done_before, "files_in_index": n_index,
              "oof_studies": summary.oof_studies, "test_studies": summary.test_studies,
              "studies_without_weights": summary.no_weights, "files_failed": len(summary.failed),
              "device": x.device.type, "amp": str(x.amp).replace("torch.", "") if x.amp else "none",
              "versions": library_versions(), "timings_s": {k: round(v, 3) for k, v in x.timing.items()}}
    (x.out_dir / "extract_run.json").write_text(json.dumps(record, indent=2, default=str))


def run_extraction(cfg: ExtractConfig) -> ExtractSummary:
    t_start = time.perf_counter()
    tta, spec, device, amp, inv, _ = check_inputs(cfg)
    out_dir = Path(cfg.output_dir)
    _check_resume(cfg, out_dir)
    folds = _usable_folds(inv, cfg.weights_dir)
    folds_path = resolve_folds_file(cfg)
    study_fold = read_folds_file(folds_path) if folds_path else {}
    log.info("out-of-fold assignment: %s", folds_path or "none (every study gets every fold)")
    members = [(m.name, m.image_size) for m in inv.models]
    labels = [member_label(k) for k in members]
    sizes = parse_input_sizes(cfg.input_size, labels)

    try:
        jobs, info = find_series(cfg.data_dir, num_workers=cfg.num_workers, progress=cfg.progress)
    except InputError as e:
        raise UsageError(str(e)) from e
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir / "extract_config.yaml")
    summary = ExtractSummary(out_dir, n_series=len(jobs), folds=folds, failed=list(info.errors))
    _count_studies(summary, jobs, study_fold)
    settings = InputSettings(spec, tuple(sorted({sizes.get(lb, k[1]) for lb, k in zip(labels, members)})), tta,
                             cfg.center_crop, cfg.fix_bits_stored_12, cfg.seed)
    x = _Extraction(cfg, out_dir, study_fold, dict(zip([(j.study_uid, j.series_uid) for j in jobs],
                                                         series_file_names(jobs))),
                    members, labels, settings, describe_inputs(tta, spec, info, cfg.center_crop), device, amp, sizes,
                    tta.mode == "flip", summary, {"wait_for_data": 0.0, "cnn": 0.0, "load_models": 0.0, "write": 0.0},
                    {e[0] for e in summary.failed})
    for fold in folds:
        _extract_fold(x, inv, fold, jobs)
    index = write_index(out_dir)
    _write_csv(pd.DataFrame(summary.failed, columns=["path", "stage", "error"]), out_dir / "errors.csv")
    if info.discovery is not None:
        write_manifest(info.discovery, out_dir / "manifest.csv")
    summary.seconds = time.perf_counter() - t_start
    x.timing["total"] = summary.seconds
    _write_run_record(x, inv, folds_path, len(index))
    return summary


def write_index(out_dir: Path) -> pd.DataFrame:
    """features_index.csv and per_slice_probs.csv from every file under features/ (this run's and earlier)."""
    rows, prob_rows = [], []
    for path in features_files(out_dir):
        try:
            sf = read_series_features(path)
        except FeaturesError as e:
            log.error("%s", e)
            continue
        rel = path.relative_to(out_dir).as_posix()
        rows.append({"StudyInstanceUID": sf.study_uid, "SeriesInstanceUID": sf.series_uid, "fold": sf.fold,
                     "role": sf.role, "n_slices": sf.n_slices, "path": rel})
        for member, p in zip(sf.members, sf.probs):
            frame = pd.DataFrame(p, columns=list(CLASSES))
            frame.insert(0, "member", member_label(member))
            frame.insert(0, "role", sf.role)
            frame.insert(0, "fold", sf.fold)
            frame.insert(0, "position", sf.positions)
            frame.insert(0, "slice_index", sf.slice_index)
            frame.insert(0, "SOPInstanceUID", sf.sop_uids)
            frame.insert(0, "SeriesInstanceUID", sf.series_uid)
            frame.insert(0, "StudyInstanceUID", sf.study_uid)
            prob_rows.append(frame)
    index = pd.DataFrame(rows, columns=["StudyInstanceUID", "SeriesInstanceUID", "fold", "role", "n_slices", "path"])
    _write_csv(index, out_dir / "features_index.csv")
    probs = (pd.concat(prob_rows, ignore_index=True) if prob_rows else
             pd.DataFrame(columns=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "slice_index",
                                   "position", "fold", "role", "member", *CLASSES]))
    _write_csv(probs, out_dir / "per_slice_probs.csv")
    return index


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, float_format="%.7g"))

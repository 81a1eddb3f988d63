"""The batch job behind scripts/ctclip_preprocess.py: a folder of NIfTI volumes -> one HDF5 store.

Workers (a process pool) read and compute; the main process is the single writer of the store
(`ctclip.data.store_writer`). A volume that fails is named in the log and in the errors CSV and the others
go on; re-running skips what is complete and retries the rest.

With --num_shards N --shard_index I the run does only shard I of the volumes (`ctclip.data.shards`)
into its own store, ``<out stem>.shard-<I>-of-<N>.h5``: one task of a cluster array job. Each shard
store is an ordinary store (resumable, crash-safe) that also records its shard; the shard stores are
merged afterwards by scripts/ctclip_merge_stores.py.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ctclip.data.nifti import VolumeError, read_nifti
from ctclip.data.preprocess import VolumeParams, preprocess_volume
from ctclip.data.rescale import CsvRescale, RescaleError
from ctclip.data.shards import check_shard, select_shard, shard_path
from ctclip.data.store import StoreError
from ctclip.data.store_writer import StoreSpec, StoreWriter
from ctcore.errors import UsageError
from ctcore.schema import arg

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept")




@dataclass
class PreprocessConfig:
    ct_data_path: Path = arg(help="folder searched recursively for .nii.gz/.nii")
    ct_out_path: Path = arg(help="the HDF5 store to write (.h5)")
    metadata_path: Path | None = arg(None, help="CT-RATE metadata CSV (VolumeName, RescaleSlope, RescaleIntercept)")
    target_shape: tuple[int, int, int] = arg((160, 224, 224), metavar=("D", "H", "W"))
    num_workers: int = arg(4, help="worker processes computing volumes (0 = in the main process)")
    slide_b2u: bool = arg(True, help="store slices bottom (inferior) to up (superior)")
    layout: str = arg("seed", choices=["seed", "radiological"],  # ctclip.data.preprocess
                      help="in-plane layout: seed = rows anterior->posterior, columns patient left->right (the "
                           "seed's stores); radiological = columns patient right->left. Recorded in the store; "
                           "training and evaluation refuse a store whose layout differs from the model's")
    quantize: str = arg("trunc", choices=["trunc", "round"],
                        help="HU -> uint8: trunc as the seed does (byte-identical stores), or round to the nearest "
                             "level")
    rescale: str = arg("auto", choices=["auto", "csv", "none"],
                       help="how stored values become HU: auto decides per volume and never applies a scaling twice")
    hu_range: tuple[float, float] = arg((-1000.0, 1000.0), metavar=("LO", "HI"))
    spacing: tuple[float, float, float] | None = arg(
        None, metavar=("X", "Y", "Z"), help="resample to this voxel size in mm before fitting (e.g. 0.75 0.75 1.5)")
    overwrite: bool = arg(False, help="start a new store instead of resuming")
    limit: int | None = arg(None, help="only the first N volumes (sorted by name)")
    errors_csv: Path | None = arg(None, help="default: <ct_out_path>.errors.csv (of the shard store when sharded)")
    # with shard_index: this run does one shard of the volumes
    num_shards: int | None = arg(None, help="split the volumes into N shards by a hash of the VolumeName (with "
                                            "--shard_index)")
    shard_index: int | None = arg(None, help="do shard I (0..N-1) only, into <ct_out_path stem>.shard-<I>-of-<N>.h5 "
                                             "(e.g. $SLURM_ARRAY_TASK_ID)")

    def volume_params(self) -> VolumeParams:
        return VolumeParams(tuple(self.target_shape), tuple(map(float, self.hu_range)), self.slide_b2u,
                            self.rescale, None if self.spacing is None else tuple(map(float, self.spacing)),
                            self.layout, self.quantize)  # type: ignore[arg-type]

    def store_config(self) -> dict[str, Any]:
        """What determines the stored arrays (paths, workers and limits do not)."""
        params = self.volume_params()
        p = asdict(params)
        p["axis_codes"] = params.codes  # read back by ctclip.data.store.store_axis_codes
        return p


@dataclass
class PreprocessSummary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (VolumeName, path, error)
    seconds: float = 0.0
    first_seconds: float = 0.0  # until the first volume was stored (start-up cost of the pool)
    decisions: dict[str, int] = field(default_factory=dict)
    store: Path | None = None
    shard: tuple[int, int] | None = None
    shard_volumes: tuple[int, int] = (0, 0)  # (volumes in this shard, volumes in all shards)

    def line(self) -> str:
        d = ", ".join(f"{k} {v}" for k, v in sorted(self.decisions.items())) or "none"
        shard = ""
        if self.shard is not None:
            shard = (f"; shard {self.shard[0]} of {self.shard[1]}: {self.shard_volumes[0]} of "
                     f"{self.shard_volumes[1]} volumes -> {self.store}")
        return (f"preprocess: {self.done} done, {self.skipped} skipped (already in store), "
                f"{len(self.failed)} failed, {self.seconds:.1f} s; rescale decisions: {d}{shard}")


def volume_name(path: Path) -> str:
    return path.name


def find_volumes(root: Path) -> list[Path]:
    """All .nii.gz / .nii files under `root`, sorted by VolumeName; duplicate names are an error."""
    if not root.is_dir():
        raise UsageError(f"--ct_data_path {root}: not a folder")
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)),
                   key=lambda p: (volume_name(p), str(p)))
    if not files:
        raise UsageError(f"--ct_data_path {root}: no .nii.gz or .nii files found")
    seen: dict[str, Path] = {}
    for p in files:
        if volume_name(p) in seen:
            raise UsageError(f"two files share the VolumeName {volume_name(p)}: {seen[volume_name(p)]} and {p}")
        seen[volume_name(p)] = p
    return files


def load_metadata(path: Path) -> dict[str, CsvRescale]:
    """VolumeName -> CSV slope/intercept. Rows with NaN values are kept (and judged per volume)."""
    if not path.is_file():
        raise UsageError(f"--metadata_path {path}: no such file")
    try:
        df = pd.read_csv(path, usecols=lambda c: c in METADATA_COLUMNS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UsageError(f"--metadata_path {path}: not a readable CSV ({e})") from e
    missing = [c for c in METADATA_COLUMNS if c not in df.columns]
    if missing:
        raise UsageError(f"--metadata_path {path}: missing column(s) {', '.join(missing)}")
    slope = pd.to_numeric(df["RescaleSlope"], errors="coerce")
    inter = pd.to_numeric(df["RescaleIntercept"], errors="coerce")
    out: dict[str, CsvRescale] = {}
    for name, s, i in zip(df["VolumeName"].astype(str), slope, inter):
        out.setdefault(name, CsvRescale(float(s), float(i)))
    return out


def _metadata_row(meta: dict[str, CsvRescale], name: str) -> CsvRescale | None:
    if name in meta:
        return meta[name]
    if name.endswith(".nii"):  # an uncompressed copy of a CT-RATE volume
        return meta.get(name + ".gz")
    return None


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the pool provides the parallelism


def _process(path: Path, csv_row: CsvRescale | None, params: VolumeParams) -> tuple[np.ndarray, dict[str, Any]]:
    vol = read_nifti(path)
    try:
        return preprocess_volume(vol, csv_row, params)
    except RescaleError as e:
        raise VolumeError(path, str(e)) from e


class _ErrorLog:
    """Failures, appended as they happen so that a killed run still leaves them on disk."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh = open(path, "w", newline="")
        self._w = csv.writer(self._fh)
        self._w.writerow(["VolumeName", "path", "error"])
        self._fh.flush()

    def add(self, name: str, path: str, error: str) -> None:
        self._w.writerow([name, path, error])
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _results(tasks: list[tuple[str, Path, CsvRescale | None]], params: VolumeParams, workers: int
             ) -> Iterator[tuple[str, Path, tuple[np.ndarray, dict[str, Any]] | BaseException]]:
    """(name, path, result or exception) in completion order; at most 2 x workers volumes in flight."""
    if workers <= 0:
        for name, path, row in tasks:
            try:
                yield name, path, _process(path, row, params)
            except Exception as e:  # noqa: BLE001 - reported per volume, the run goes on
                yield name, path, e
        return
    # forkserver/spawn: a worker must not inherit the store's file descriptor (and with it the HDF5
    # file lock), or a killed run would leave the store locked until its orphaned workers exit
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, mp_context=mp.get_context(method)) as pool:
        queue = iter(tasks)
        running: dict[Future, tuple[str, Path]] = {}
        while True:
            while len(running) < 2 * workers:
                nxt = next(queue, None)
                if nxt is None:
                    break
                running[pool.submit(_process, nxt[1], nxt[2], params)] = (nxt[0], nxt[1])
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name, path = running.pop(fut)
                exc = fut.exception()
                yield name, path, exc if exc is not None else fut.result()


def run_preprocess(cfg: PreprocessConfig, version: str = "") -> PreprocessSummary:
    t0 = time.perf_counter()
    params = cfg.volume_params()
    if cfg.rescale not in ("auto", "csv", "none"):
        raise UsageError(f"--rescale must be auto, csv or none, got {cfg.rescale!r}")
    if cfg.rescale == "csv" and cfg.metadata_path is None:
        raise UsageError("--rescale csv needs --metadata_path")
    try:
        shard = check_shard(cfg.shard_index, cfg.num_shards)
    except ValueError as e:
        raise UsageError(str(e)) from e
    files = find_volumes(Path(cfg.ct_data_path))
    if cfg.limit is not None:
        files = files[: cfg.limit]
    meta = load_metadata(Path(cfg.metadata_path)) if cfg.metadata_path is not None else {}
    out = Path(cfg.ct_out_path)
    errors_path = Path(cfg.errors_csv) if cfg.errors_csv else None
    summary = PreprocessSummary(shard=shard)
    if shard is not None:
        n_all = len(files)
        files = select_shard(files, *shard, key=volume_name)
        out = shard_path(out, *shard)
        errors_path = shard_path(errors_path, *shard) if errors_path is not None else None  # one per task
        summary.shard_volumes = (len(files), n_all)
        log.info("shard %d of %d: %d of %d volumes -> %s", *shard, len(files), n_all, out)
        if not files:
            log.warning("shard %d of %d has no volumes (of %d): writing an empty store", *shard, n_all)
    summary.store = out
    if not out.parent.exists():
        log.info("creating output folder %s", out.parent)
    names = [volume_name(p) for p in files]
    try:
        writer = StoreWriter.open(out, names, StoreSpec(tuple(cfg.target_shape), cfg.store_config(), version, shard),
                                  overwrite=cfg.overwrite)
    except StoreError as e:
        raise UsageError(str(e)) from e
    errors = _ErrorLog(errors_path or out.with_name(out.name + ".errors.csv"))
    try:
        pending = set(writer.pending(names))
        summary.skipped = len(names) - len(pending)
        tasks = [(volume_name(p), p, _metadata_row(meta, volume_name(p))) for p in files if volume_name(p) in pending]
        if meta:
            no_row = sum(1 for _, _, row in tasks if row is None)
            if no_row:
                log.warning("%d of %d volumes have no row in %s", no_row, len(tasks), cfg.metadata_path)
        with logging_redirect_tqdm(), tqdm(total=len(tasks), desc="preprocess", unit="vol") as bar:
            for name, path, result in _results(tasks, params, cfg.num_workers):
                if isinstance(result, BaseException):
                    msg = str(result) if isinstance(result, VolumeError) else f"{path}: {type(result).__name__}: {result}"
                    log.error("failed: %s", msg)
                    summary.failed.append((name, str(path), msg))
                    errors.add(name, str(path), msg)
                else:
                    volume, attrs = result
                    writer.commit(name, volume, attrs)
                    summary.done += 1
                    if summary.done == 1:
                        summary.first_seconds = time.perf_counter() - t0
                    summary.decisions[attrs["rescale"]] = summary.decisions.get(attrs["rescale"], 0) + 1
                    log.info("%s: rescale %s (%s)", name, attrs["rescale"], attrs["rescale_reason"])
                bar.update(1)
    finally:
        writer.close()
        errors.close()
    summary.seconds = time.perf_counter() - t0
    return summary


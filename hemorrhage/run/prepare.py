"""A folder tree of head CT DICOM files -> windowed uint8 slices for the RSNA 2019 models.

    python scripts/hemorrhage_prepare.py --input_dir /data/dicoms --output_dir /data/processed
    python scripts/hemorrhage_prepare.py -i /data/dicoms -o /data/processed --format npz --window three -j 16

Writes under the output folder:

    png/ID_<SOPInstanceUID>.png   --format png (default, the original's layout): one windowed uint8 image
                                  per slice (RSNA UIDs that already start with ID_ are not prefixed again);
                                  three-window images hold (brain, subdural, bone) in cv2's channel order,
                                  so cv2.imread returns them in that order
    npz/<SeriesInstanceUID>.npz   --format npz (the fast path): ``images`` (N, H, W) or, three windows,
                                  (N, 3, H, W) uint8 in position order, ``sop_uids``, ``positions``
                                  (mm along the normal), ``quirk_fixed``, ``study_uid``, ``series_uid``,
                                  ``window``; --compress deflates them
    manifest.csv                  one row per file: study, series, SOP, path, position, order, flags,
                                  included, output, status, quirk_fixed, window, window_fallback (see
                                  hemorrhage.series; window_fallback 1: no usable WindowCenter/Width,
                                  windowed with brain 40/80, hemorrhage.windows.DEFAULT_WINDOW)
    errors.csv                    path, stage, error of every file that failed
    prepare_config.yaml           the settings used (a resumed run must use the same ones)

Re-running the same command resumes: outputs are written through temporary names (ctcore.atomic), so an
existing PNG is complete and skipped; an npz is skipped when it holds exactly the series' planned slices.
`run_prepare` raises `UsageError` for bad input (exit 2 in the script) and lists failed files in the
summary (exit 3), after writing everything else.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ctcore.cli import resolved, save_resolved
from ctcore.errors import UsageError
from ctcore.schema import arg
from hemorrhage.run.prepare_worker import SliceResult, Task, png_name, run_task
from hemorrhage.series import (
    EXCLUDING,
    Discovery,
    FileError,
    Series,
    discover,
    make_pool,
    relative,
    resolve_workers,
    write_errors,
    write_manifest,
)
from hemorrhage.windows import WindowSpec, header_window, parse_window_spec

log = logging.getLogger(__name__)

FORMATS = ("png", "npz")
OUTPUTS = ("png", "npz", "manifest.csv", "errors.csv", "prepare_config.yaml")
RESUME_KEYS = ("format", "window", "fix_bits_stored_12", "original_int")  # settings that change the outputs
SLICES_PER_TASK = 16  # PNG mode: slices per pool task (fewer round trips than one per slice)


@dataclass
class PrepareConfig:
    input_dir: Path = arg(flags=("-i",), help="folder searched recursively for DICOM files")
    output_dir: Path = arg(flags=("-o",), help="folder for png/ or npz/, manifest.csv and errors.csv")
    format: str = arg("png", choices=FORMATS,
                      help="png: one image per slice as the original; npz: one uint8 stack per series (faster)")
    window: str = arg("header", help="header (the slice's own WindowCenter/Width, first value), three (brain "
                                     "40/80, subdural 80/200, bone 600/2800 as 3 channels), brain, subdural, "
                                     "bone, or CENTER/WIDTH e.g. 40/80")
    num_workers: int = arg(-1, flags=("--n_jobs", "-j"),
                           help="worker processes (-1 = all CPUs, 0 = in this process)")
    fix_bits_stored_12: bool = arg(
        True, help="apply the community fix to BitsStored-12 / intercept > -100 slices (counted)")
    original_int: bool = arg(
        False, help="truncate WindowCenter/Width, RescaleSlope/Intercept with int() as the original did")
    compress: bool = arg(False, help="npz: deflate the stacks (about PNG size; slower to write and to load)")
    overwrite: bool = arg(False, help="remove this tool's earlier outputs instead of resuming")
    progress: bool = arg(True, cli=False)

    def window_spec(self) -> WindowSpec:
        return parse_window_spec(self.window, self.original_int)


@dataclass
class PrepareSummary:
    output_dir: Path
    fmt: str
    window: str
    n_files: int = 0
    n_studies: int = 0
    n_series: int = 0
    n_slices: int = 0  # slices to write (left-out files excluded)
    written: int = 0
    done_before: int = 0
    quirk_fixed: int = 0  # slices written this run with the BitsStored-12 fix applied
    window_fallback: int = 0  # slices written this run with brain 40/80 for want of a header window
    left_out: Counter = field(default_factory=Counter)
    failed: list[FileError] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        out = ", ".join(f"{k} {v}" for k, v in sorted(self.left_out.items())) or "none"
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return (f"hemorrhage_prepare: {self.n_files} files -> {self.n_studies} studies, "
                f"{self.n_series} series, {self.n_slices} slices ({self.fmt}, {self.window}): "
                f"{self.written} written, {self.done_before} already done, {len(self.failed)} failed; "
                f"left out: {out}; {self.quirk_fixed} BitsStored-12 fixes; {self.window_fallback} without a "
                f"header window (brain 40/80); {self.seconds:.1f} s "
                f"({rate:.0f} slices/s) -> {self.output_dir}")


# ----------------------------------------------------------------------------------------- the run


def prepare_output(cfg: PrepareConfig) -> None:
    """Create the output folder; on resume demand the same output-changing settings; --overwrite clears it."""
    out = Path(cfg.output_dir)
    saved = out / "prepare_config.yaml"
    if cfg.overwrite:
        for name in OUTPUTS:  # only what this tool writes
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif saved.is_file():
        before = yaml.safe_load(saved.read_text()) or {}
        now = resolved(cfg)
        diff = [k for k in RESUME_KEYS if k in before and before[k] != now[k]]
        if diff:
            was = ", ".join(f"{k}={before[k]!r}" for k in diff)
            raise UsageError(f"{out} was prepared with other settings ({was}); use the same settings to "
                             "resume, --overwrite to start again, or another --output_dir")
    (out / cfg.format).mkdir(parents=True, exist_ok=True)
    for tmp in [*(out / cfg.format).glob(".*.tmp"), *(out / cfg.format).glob(".*.partial-*")]:  # a killed run's
        tmp.unlink()


def _npz_complete(path: Path, sops: list[str]) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["sop_uids"].tolist() == sops
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable, written again (%s)", path, e)
        return False


def plan_tasks(d: Discovery, cfg: PrepareConfig) -> tuple[list[Task], dict[str, str], set[str]]:
    """(tasks still to do, output per file path, file paths whose output already exists)."""
    out = Path(cfg.output_dir)
    tasks: list[Task] = []
    outputs: dict[str, str] = {}
    done: set[str] = set()
    for s in d.series:
        if not s.slices:
            continue
        paths = [e.header.path for e in s.slices]
        if cfg.format == "npz":
            npz = out / "npz" / f"{s.series_uid}.npz"
            outputs.update(dict.fromkeys(paths, relative(str(npz), out)))
            sops = [e.header.sop_uid for e in s.slices]
            if _npz_complete(npz, sops):
                done.update(paths)
                continue
            positions = tuple(np.nan if e.position is None else e.position for e in s.slices)
            tasks.append(Task(tuple(paths), npz=str(npz), compress=cfg.compress, sop_uids=tuple(sops),
                              study_uid=s.study_uid, series_uid=s.series_uid, positions=positions))
            continue
        todo = []
        for e in s.slices:
            png = out / "png" / png_name(e.header.sop_uid)
            outputs[e.header.path] = relative(str(png), out)
            if png.is_file():
                done.add(e.header.path)
            else:
                todo.append((e.header.path, str(png)))
        for i in range(0, len(todo), SLICES_PER_TASK):
            chunk = todo[i:i + SLICES_PER_TASK]
            tasks.append(Task(tuple(p for p, _ in chunk), tuple(q for _, q in chunk)))
    return tasks, outputs, done


def _run_tasks(tasks: list[Task], pool: Executor | None, spec: WindowSpec, fix: bool, progress: bool
               ) -> list[SliceResult]:
    from tqdm.auto import tqdm

    results: list[SliceResult] = []
    with tqdm(total=sum(len(t.paths) for t in tasks), desc="slices", unit="slice",
              disable=None if progress else True) as bar:
        if pool is None:
            for t in tasks:
                try:
                    results += run_task(t, spec, fix)
                except OSError as e:  # cannot write (full disk, permissions): these slices fail
                    results += _task_failed(t, e)
                bar.update(len(t.paths))
            return results
        queue, running = iter(tasks), {}  # at most 2 tasks per worker in flight: bounded memory
        limit = 2 * getattr(pool, "_max_workers", 2)
        while True:
            while len(running) < limit and (t := next(queue, None)) is not None:
                running[pool.submit(run_task, t, spec, fix)] = t
            if not running:
                return results
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = running.pop(fut)
                results += _task_results(fut, t)
                bar.update(len(t.paths))


def _task_results(fut: Future, t: Task) -> list[SliceResult]:
    exc = fut.exception()
    if exc is None:
        return fut.result()
    if isinstance(exc, (OSError, BrokenProcessPool)):  # cannot write, or a worker was killed (memory)
        return _task_failed(t, exc)
    raise exc  # anything else is a bug: stop loudly, as the serial path does


def _task_failed(t: Task, exc: BaseException) -> list[SliceResult]:
    log.error("task of %d slices failed: %s: %s", len(t.paths), type(exc).__name__, exc)
    return [SliceResult(p, error=f"{type(exc).__name__}: {exc}", stage="write") for p in t.paths]


def _manifest_extra(d: Discovery, cfg: PrepareConfig, spec: WindowSpec, outputs: dict[str, str],
                    done: set[str], results: dict[str, SliceResult]) -> dict[str, dict[str, object]]:
    extra: dict[str, dict[str, object]] = {}
    for s in d.series:
        for e in s.entries:
            p, h = e.header.path, e.header
            r = results.get(p)
            status = ("left_out" if not e.included else "failed" if r is not None and r.error
                      else "written" if r is not None else "done_before" if p in done else "")
            window = spec.describe() if spec.mode != "header" else str(
                header_window(h.window_center, h.window_width, original_int=spec.original_int))
            extra[p] = {"output": outputs.get(p, "") if status in ("written", "done_before") else "",
                        "status": status, "window": window,
                        "quirk_fixed": int(e.included and cfg.fix_bits_stored_12 and h.needs_quirk_fix),
                        "window_fallback": int(e.included and spec.falls_back(h.window_center, h.window_width))}
    return extra


def _series_count(series: list[Series]) -> int:
    return sum(1 for s in series if s.slices)


def run_prepare(cfg: PrepareConfig) -> PrepareSummary:
    """Discover, decode, window and write every slice under cfg.input_dir (see the module docstring)."""
    t0 = time.perf_counter()
    root, out = Path(cfg.input_dir), Path(cfg.output_dir)
    if not root.is_dir():
        raise UsageError(f"--input_dir {root}: no such folder")
    if cfg.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    try:
        spec = cfg.window_spec()
    except ValueError as e:
        raise UsageError(str(e)) from e
    prepare_output(cfg)
    save_resolved(cfg, out / "prepare_config.yaml")
    pool = make_pool(cfg.num_workers)
    try:
        d = discover(root, progress=cfg.progress, pool=pool)
        summary = PrepareSummary(out, cfg.format, spec.describe(), d.n_files, d.n_studies,
                                 _series_count(d.series), d.n_slices)
        summary.left_out = Counter({f: n for f, n in d.flag_counts.items() if f in EXCLUDING})
        if d.n_files == 0:
            raise UsageError(f"--input_dir {root}: no candidate files ({d.skipped_files} skipped by name)")
        if d.n_slices == 0:
            write_errors(d.errors, out / "errors.csv", root)
            left = ", ".join(f"{k} {v}" for k, v in sorted(summary.left_out.items())) or "none"
            raise UsageError(f"--input_dir {root}: no CT slices among {d.n_files} files ({len(d.errors)} "
                             f"unreadable, left out: {left}); see {out / 'errors.csv'}")
        tasks, outputs, done = plan_tasks(d, cfg)
        workers = resolve_workers(cfg.num_workers)
        log.info("%d slices in %d series: %d already done, %d to write %s", d.n_slices, summary.n_series,
                 len(done), d.n_slices - len(done),
                 f"with {workers} worker processes" if pool is not None else "in this process")
        results = _run_tasks(tasks, pool, spec, cfg.fix_bits_stored_12, cfg.progress)
    finally:
        if pool is not None:
            pool.shutdown()
    by_path = {r.path: r for r in results}
    failed = [FileError(r.path, r.stage, r.error) for r in results if r.error]
    for f in failed:
        log.error("failed: %s: %s", f.path, f.error)
    summary.failed = sorted(d.errors + failed, key=lambda e: e.path)
    summary.written = sum(1 for r in results if not r.error)
    summary.done_before = len(done)
    summary.quirk_fixed = sum(1 for r in results if r.quirk_fixed and not r.error)
    summary.window_fallback = sum(1 for r in results if r.window_fallback and not r.error)
    if summary.window_fallback:
        log.warning("%d slices have no usable WindowCenter/WindowWidth: windowed with brain 40/80 (the original "
                    "wrote no image for them); window_fallback = 1 in %s", summary.window_fallback,
                    out / "manifest.csv")
    extra = _manifest_extra(d, cfg, spec, outputs, done, by_path)
    write_manifest(d, out / "manifest.csv", extra,
                   ("output", "status", "quirk_fixed", "window", "window_fallback"))
    write_errors(summary.failed, out / "errors.csv", root)
    summary.seconds = time.perf_counter() - t0
    return summary

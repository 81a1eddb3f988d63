"""Merging the shard stores of a sharded preprocessing run into one store (scripts/ctclip_merge_stores.py;
the shards themselves: `ctclip.data.shards`).

`merge_stores` builds one store from the shard stores:

- ``copy``: a real store, written through `StoreWriter` (the layout of any store: chunked by slice,
  uncompressed, every attribute), so it is crash-safe and resumable like preprocessing: a re-run copies
  only volumes that are missing in the output or whose attributes changed in their shard.
- ``virtual``: a small file of HDF5 virtual datasets that read from the shard stores, with every volume
  attribute copied; the shard paths are stored relative to it, so the folder can move as a whole. It is
  rebuilt whole on every run (metadata only: seconds). `VolumeStore` checks on open that the shard
  stores are there (HDF5 itself would read a missing one as zeros).

Both refuse stores of different preprocessing configs or shapes, a VolumeName in two stores, shard
stores of different shard counts, and missing shards (unless asked to go on without them). A volume
that is incomplete in its shard (failed or interrupted) or not a valid volume dataset is skipped the
way `VolumeStore` hides it, and listed in the summary and in ``<out>.skipped.csv``.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from ctclip.data.shards import shard_of
from ctclip.data.store import (
    PENDING,
    READABLE_VERSIONS,
    STORE_VERSION,
    VIRTUAL_SOURCES_ATTR,
    VOLUME_ATTRS,
    StoreError,
    VolumeStore,
    store_shard,
)
from ctclip.data.store_writer import StoreSpec, StoreWriter
from ctcore.atomic import atomic_write
from ctcore.errors import UsageError
from ctcore.schema import arg

log = logging.getLogger(__name__)
MODES = ("copy", "virtual")


class MergeError(UsageError):
    """The stores cannot be merged as asked; nothing was written."""


@dataclass
class MergeConfig:
    # store files or glob patterns (expanded here, so an array job's quoted pattern works)
    stores: list[str] = arg(help="the shard stores: files or glob patterns (e.g. 'data/train_volumes.shard-*.h5')")
    out: Path = arg(help="the merged store (.h5)")
    mode: str = arg("copy", choices=MODES, help="copy: a real store (resumable); virtual: HDF5 virtual datasets "
                                                "into the shard stores")
    overwrite: bool = arg(False, help="rebuild the output instead of resuming it")
    allow_missing_shards: bool = arg(False, help="merge although some shards of the run are missing (their "
                                                 "volumes are left out)")
    skipped_csv: Path | None = arg(None, help="skipped volumes: store, VolumeName, reason (default: "
                                              "<out>.skipped.csv)")


@dataclass
class SourceStore:
    """What the merge learned about one input store."""

    path: Path
    target_shape: tuple[int, int, int]
    config: dict[str, Any]
    version: str
    shard: tuple[int, int] | None
    volumes: list[str] = field(default_factory=list)  # complete, valid: merged
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (VolumeName, reason)


@dataclass
class MergeSummary:
    out: Path
    mode: str
    n_stores: int = 0
    merged: int = 0  # volumes in the output
    copied: int = 0  # copy mode: written by this run
    kept: int = 0  # copy mode: already in the output and unchanged
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (store, VolumeName, reason)
    missing_shards: list[int] = field(default_factory=list)
    skipped_csv: Path | None = None
    seconds: float = 0.0

    def line(self) -> str:
        detail = f"{self.copied} copied, {self.kept} already there; " if self.mode == "copy" else ""
        missing = f"; MISSING shards {self.missing_shards}" if self.missing_shards else ""
        return (f"merge ({self.mode}): {self.n_stores} stores -> {self.merged} volumes in {self.out}; {detail}"
                f"{len(self.skipped)} skipped (incomplete or invalid){missing}; {self.seconds:.1f} s")


def expand_store_paths(patterns: Sequence[str | Path]) -> list[Path]:
    """Files and glob patterns -> the store files, sorted, each once; a pattern matching nothing or a
    missing file is an error (a shard that was never written must not vanish silently)."""
    found: dict[Path, Path] = {}
    for pattern in patterns:
        text = str(pattern)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise MergeError(f"--stores {text}: matches no file")
        elif Path(text).is_file():
            matches = [text]
        else:
            raise MergeError(f"--stores {text}: no such file")
        for m in matches:
            found.setdefault(Path(m).resolve(), Path(m))
    if not found:
        raise MergeError("--stores: no store given")
    return sorted(found.values())


def _volume_problem(obj: Any, shape: tuple[int, ...]) -> str | None:
    """Why a member of a store is not a volume to merge (None: it is one). Incomplete volumes are the ones
    `VolumeStore` hides; the other checks catch what a reader would fail on later."""
    if not isinstance(obj, h5py.Dataset):
        return "invalid: not a dataset"
    attrs = obj.attrs
    if "complete" not in attrs:
        return "invalid: no 'complete' attribute"
    if int(attrs["complete"]) != 1:
        return "incomplete: failed or interrupted during preprocessing (see the shard's errors CSV)"
    if obj.dtype != np.uint8 or tuple(obj.shape) != tuple(shape):
        return f"invalid: {obj.dtype} {tuple(obj.shape)}, the store holds uint8 {tuple(shape)}"
    keys = set(attrs.keys())
    missing = [k for k in VOLUME_ATTRS if k not in keys]
    if missing:
        return f"invalid: missing attribute(s) {', '.join(missing)}"
    extra = sorted(keys - set(VOLUME_ATTRS))
    if extra:
        return f"invalid: unexpected attribute(s) {', '.join(extra)}"
    return None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def inspect_store(path: Path) -> SourceStore:
    """Read a store's file attributes and sort its members into volumes to merge and skipped ones."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise MergeError(f"{path}: cannot be opened as an HDF5 store ({e}). Is its preprocessing task still "
                         "running? If the file is damaged, run that task again with --overwrite") from e
    with f:
        if "config" not in f.attrs or "target_shape" not in f.attrs:
            raise MergeError(f"{path}: not a ctclip store (no config / target_shape attributes)")
        if VIRTUAL_SOURCES_ATTR in f.attrs:
            raise MergeError(f"{path}: is itself a merged virtual store; merge the shard stores it points to")
        version = int(f.attrs.get("store_version", -1))
        if version not in READABLE_VERSIONS:
            raise MergeError(f"{path}: store version {version}, this code reads {', '.join(map(str, READABLE_VERSIONS))}")
        src = SourceStore(path=path, target_shape=tuple(int(x) for x in f.attrs["target_shape"]),
                          config=json.loads(f.attrs["config"]), version=_text(f.attrs.get("ctclip_version", "")),
                          shard=store_shard(f.attrs))
        pending = f.get(PENDING)
        members = [(n, n) for n in f.keys() if n != PENDING] + [(n, f"{PENDING}/{n}") for n in (pending or {})]
        for name, key in sorted(members):
            try:
                problem = _volume_problem(f[key], src.target_shape)
            except (OSError, KeyError, ValueError) as e:  # a damaged object header
                problem = f"unreadable: {type(e).__name__}: {e}"
            if problem is None:
                src.volumes.append(name)
            else:
                src.skipped.append((name, problem))
    if src.shard is not None:
        index, n = src.shard
        foreign = [name for name in src.volumes + [s[0] for s in src.skipped] if shard_of(name, n) != index]
        if foreign:
            raise MergeError(f"{path}: claims to be shard {index} of {n} but holds {len(foreign)} volume(s) of other "
                             f"shards (e.g. {foreign[0]}); it was not written by this sharding, rebuild it")
    return src


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def check_sources(sources: list[SourceStore], allow_missing_shards: bool = False) -> list[int]:
    """Refuse inputs that do not belong together; returns the missing shard indices (allowed ones)."""
    ref = sources[0]
    for s in sources[1:]:
        if s.target_shape != ref.target_shape:
            raise MergeError(f"{s.path} holds volumes of shape {s.target_shape}, {ref.path} of {ref.target_shape}: "
                             "they come from different preprocessing runs")
        diff = _config_diff(s.config, ref.config)
        if diff:
            raise MergeError(f"{s.path} and {ref.path} were written with different preprocessing configs ({diff}); "
                             "merge only stores of one preprocessing run")
    missing: list[int] = []
    sharded = [s for s in sources if s.shard is not None]
    if sharded:
        counts = sorted({s.shard[1] for s in sharded})
        if len(counts) > 1:
            examples = "; ".join(f"{next(s.path for s in sharded if s.shard[1] == n)} is one of {n}" for n in counts)
            raise MergeError(f"shard stores of different --num_shards ({examples}); leave out the stale ones")
        n = counts[0]
        by_index: dict[int, Path] = {}
        for s in sharded:
            if s.shard[0] in by_index:
                raise MergeError(f"{by_index[s.shard[0]]} and {s.path} are both shard {s.shard[0]} of {n}")
            by_index[s.shard[0]] = s.path
        missing = sorted(set(range(n)) - set(by_index))
        if missing and not allow_missing_shards:
            raise MergeError(f"shard(s) {', '.join(map(str, missing))} of {n} are missing (found {len(by_index)}): "
                             "run those array tasks (sbatch --array=<indices> ...; they resume), or pass "
                             "--allow_missing_shards to merge without their volumes")
    owner: dict[str, Path] = {}
    duplicates: list[tuple[str, Path, Path]] = []
    for s in sources:
        for name in s.volumes + [x[0] for x in s.skipped]:
            if name in owner:
                duplicates.append((name, owner[name], s.path))
            else:
                owner[name] = s.path
    if duplicates:
        name, a, b = duplicates[0]
        raise MergeError(f"{len(duplicates)} VolumeName(s) are in more than one store, e.g. {name} in {a} and {b}; "
                         "each volume must come from exactly one store")
    return missing


def _write_skipped(path: Path, rows: list[tuple[str, str, str]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["store", "VolumeName", "reason"])
            w.writerows(rows)
    atomic_write(path, write)


def merge_stores(cfg: MergeConfig) -> MergeSummary:
    t0 = time.perf_counter()
    if cfg.mode not in MODES:
        raise MergeError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    paths = expand_store_paths(cfg.stores)
    out = Path(cfg.out)
    if any(p.resolve() == out.resolve() for p in paths):
        raise MergeError(f"--out {out} is one of the input stores")
    sources = [inspect_store(p) for p in paths]
    missing = check_sources(sources, cfg.allow_missing_shards)
    if missing:
        log.warning("merging without shard(s) %s: their volumes are not in %s", missing, out)
    names = sorted(n for s in sources for n in s.volumes)
    if not names:
        raise MergeError(f"no complete volume in {len(sources)} store(s) ({paths[0]} ...): nothing to merge")
    versions = sorted({s.version for s in sources})
    if len(versions) > 1:
        log.warning("the stores were written by different ct-toolkit versions (%s) with the same config",
                    ", ".join(versions))
    summary = MergeSummary(out=out, mode=cfg.mode, n_stores=len(sources), merged=len(names), missing_shards=missing,
                           skipped=[(str(s.path), n, why) for s in sources for n, why in s.skipped])
    for store, name, why in summary.skipped:
        log.warning("skipped %s in %s: %s", name, store, why)
    spec = StoreSpec(sources[0].target_shape, sources[0].config, ", ".join(versions))
    if cfg.mode == "copy":
        _merge_copy(sources, names, out, spec, cfg.overwrite, summary)
    else:
        _merge_virtual(sources, out, spec, cfg.overwrite)
    summary.skipped_csv = Path(cfg.skipped_csv) if cfg.skipped_csv else out.with_name(out.name + ".skipped.csv")
    _write_skipped(summary.skipped_csv, summary.skipped)
    summary.seconds = time.perf_counter() - t0
    return summary


def _previous_output(out: Path, overwrite: bool) -> dict[str, dict[str, Any]]:
    """Attributes of the complete volumes of an earlier copy merge into `out` (empty when starting fresh)."""
    if overwrite or not out.exists():
        return {}
    try:
        with h5py.File(out, "r") as f:
            if VIRTUAL_SOURCES_ATTR in f.attrs:
                raise MergeError(f"{out}: exists and is a merged virtual store; --overwrite replaces it with a copy")
        with VolumeStore(out) as store:
            return {n: store.attrs(n) for n in store.names()}
    except (OSError, StoreError) as e:
        raise MergeError(f"{out}: exists but cannot be read as a store ({e}); --overwrite replaces it") from e


def _merge_copy(sources: list[SourceStore], names: list[str], out: Path, spec: StoreSpec, overwrite: bool,
                summary: MergeSummary) -> None:
    previous = _previous_output(out, overwrite)
    stale = sorted(set(previous) - set(names))
    if stale:
        skipped = {name for _, name, _ in summary.skipped}
        why = ("is now skipped in its store" if stale[0] in skipped
               else "is in no input store: the output was merged from other stores")
        raise MergeError(f"{out}: holds {len(stale)} complete volume(s) that the inputs do not provide (e.g. "
                         f"{stale[0]}, which {why}); --overwrite rebuilds it from these inputs")
    try:
        writer = StoreWriter.open(out, names, spec, overwrite=overwrite)
    except StoreError as e:
        raise MergeError(f"{e} (the merged store must match the shards' config; --overwrite rebuilds it)") from e
    buf = np.empty(spec.target_shape, dtype=np.uint8)
    with writer, tqdm(total=len(names), desc="merge", unit="vol") as bar:
        for s in sources:
            with VolumeStore(s.path) as store:
                for name in s.volumes:
                    attrs = store.attrs(name)
                    if previous.get(name) == attrs:  # done by an earlier run, and the shard has not changed
                        summary.kept += 1
                    else:
                        store.read_into(name, buf)
                        writer.commit(name, buf, {k: v for k, v in attrs.items() if k != "complete"})
                        summary.copied += 1
                    bar.update(1)


def _merge_virtual(sources: list[SourceStore], out: Path, spec: StoreSpec, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        try:
            with h5py.File(out, "r") as f:
                is_virtual = VIRTUAL_SOURCES_ATTR in f.attrs
        except OSError:
            is_virtual = False
        if not is_virtual:
            raise MergeError(f"{out}: exists and is not a merged virtual store; --overwrite replaces it")
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(spec.target_shape)
    used = [s for s in sources if s.volumes]
    # relative to the merged file's folder, which is where HDF5 looks first: the folder can move as a whole
    rels = [os.path.relpath(s.path.resolve(), out.parent.resolve()) for s in used]
    def create(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["store_version"] = STORE_VERSION
            f.attrs["ctclip_version"] = spec.version
            f.attrs["target_shape"] = np.asarray(shape, dtype="i8")
            f.attrs["config"] = json.dumps(dict(spec.config), sort_keys=True)
            f.attrs[VIRTUAL_SOURCES_ATTR] = json.dumps(rels)
            for s, rel in zip(used, rels):
                with h5py.File(s.path, "r") as sf:
                    for name in s.volumes:
                        layout = h5py.VirtualLayout(shape=shape, dtype=np.uint8)
                        layout[...] = h5py.VirtualSource(rel, name, shape=shape, dtype=np.uint8)
                        ds = f.create_virtual_dataset(name, layout, fillvalue=0)
                        src = sf[name].attrs
                        for key in src:  # the stored types too (fixed-size strings), not just the values
                            ds.attrs.create(key, src[key], dtype=src.get_id(key).dtype)
    atomic_write(out, create)  # the merged store appears whole or not at all

"""The one writer of an HDF5 volume store (layout and reader: `ctclip.data.store`).

Crash safety without a journal: a store is created complete-but-empty (every dataset of the run,
with its full file space and every attribute already allocated) in a temporary file that is renamed
into place. Committing a volume writes raw data into space that already exists, rewrites fixed-size
attributes in place, sets `complete` to 1 in a second flush, and only then moves the dataset's link
from ``/_pending/<name>`` to ``/<name>`` (a metadata-only step guarded by a ``.linking`` marker file: a
process killed inside that step leaves the marker, and the next writer checks the store before going
on). A process killed at any moment therefore leaves a store in which every volume is either
complete under its own name or still pending. Re-running the preprocessing redoes the pending ones and
gives the same store as an uninterrupted run. A volume that failed stays pending (its name is in the
run's errors CSV).

Adding volumes to an existing store (a later run over a larger folder) creates their datasets in
place; that short, metadata-only step is guarded by a marker file so an interrupted extension is
detected on the next run. A version 1 store's pending datasets are moved to ``/_pending`` on first open.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ctclip.data.store import (
    NUM_ATTRS,
    PENDING,
    READABLE_VERSIONS,
    STORE_VERSION,
    STR_ATTR_SIZES,
    VIRTUAL_SOURCES_ATTR,
    VOLUME_ATTRS,
    StoreError,
    store_shard,
)
from ctcore.atomic import atomic_write


@dataclass(frozen=True)
class StoreSpec:
    target_shape: tuple[int, int, int]
    config: Mapping[str, Any]  # the resolved preprocessing config, compared on resume
    version: str = ""
    shard: tuple[int, int] | None = None  # (shard_index, num_shards) of a shard store, compared on resume


def _placeholder_attrs(ds: h5py.Dataset) -> None:
    ds.attrs.create("complete", 0, dtype="u1")
    for key, size in STR_ATTR_SIZES.items():
        ds.attrs.create(key, b"", dtype=f"S{size}")
    for key, (shape, dtype) in NUM_ATTRS.items():
        ds.attrs.create(key, np.zeros(shape, dtype=dtype), dtype=dtype)


def _create_volume_dataset(f: h5py.File, name: str, shape: tuple[int, int, int]) -> None:
    if "/" in name or not name or name == PENDING:
        raise StoreError(f"invalid volume name {name!r}")
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # all chunks exist from the start: commits write data only
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # no zero-filling pass (the file stays sparse until written)
    ds = f.require_group(PENDING).create_dataset(name, shape=shape, dtype=np.uint8, chunks=(1, shape[1], shape[2]),
                          dcpl=dcpl, track_times=False)
    _placeholder_attrs(ds)


def _encode(value: str, size: int, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > size:
        raise StoreError(f"{what} is longer than the {size} bytes the store reserves: {value[:80]}...")
    return raw


def _shard_label(shard: tuple[int, ...] | None) -> str:
    return "an unsharded store" if shard is None else f"shard {shard[0]} of {shard[1]}"


def _marker(path: Path, what: str) -> Path:
    return path.with_name(f"{path.name}.{what}")


def _recover_link(path: Path, f: h5py.File, marker: Path) -> None:
    """A writer died while moving one volume's link. Check that the store still reads and that the
    volume is under exactly one name (its own name only once complete), then carry on."""
    name = marker.read_text()
    try:
        list(f), list(f.get(PENDING, ()))  # both groups' link tables still read
        if name != PENDING:  # (PENDING: killed while removing the empty group, which is there or not)
            done, waiting = f.get(name), f.get(f"{PENDING}/{name}")
            if done is not None and waiting is not None:
                del f[name if int(done.attrs["complete"]) != 1 else f"{PENDING}/{name}"]
            elif done is not None and int(done.attrs["complete"]) != 1:
                f.require_group(PENDING)
                f.move(name, f"{PENDING}/{name}")
            f.flush()
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise StoreError(f"{path}: a previous run was killed while storing {name!r} ({marker.name} exists) and "
                         f"the store no longer reads ({e}); rebuild it with --overwrite") from e
    marker.unlink()


def _upgrade_v1(f: h5py.File) -> None:
    """A version 1 store kept incomplete datasets beside the complete ones: move them to /_pending."""
    if int(f.attrs["store_version"]) == STORE_VERSION:
        return
    f.require_group(PENDING)
    for name in [n for n, obj in f.items() if isinstance(obj, h5py.Dataset) and int(obj.attrs["complete"]) != 1]:
        f.move(name, f"{PENDING}/{name}")
    f.attrs["store_version"] = STORE_VERSION


class StoreWriter:
    """The single writer of a store. Workers compute; only this object touches the file."""

    def __init__(self, path: Path, spec: StoreSpec, file: h5py.File):
        self.path, self.spec, self._f = path, spec, file

    @classmethod
    def open(cls, path: str | Path, names: Iterable[str], spec: StoreSpec, overwrite: bool = False) -> StoreWriter:
        """Open (or create) the store for `names`; datasets for new names are allocated up front."""
        path = Path(path)
        names = sorted(set(names))
        marker, linking = _marker(path, "extending"), _marker(path, "linking")
        if overwrite:
            path.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            linking.unlink(missing_ok=True)
        if not path.exists():
            cls._create(path, names, spec)
        elif marker.exists():
            raise StoreError(f"{path}: a previous run was interrupted while adding volumes to this store "
                             f"({marker.name} exists). Its structure may be damaged: rebuild it with --overwrite.")
        try:
            f = h5py.File(path, "r+")
        except OSError as e:
            raise StoreError(f"{path}: cannot open for writing ({e}); is another process using it, "
                             "or is it not an HDF5 store?") from e
        try:
            if linking.exists():
                _recover_link(path, f, linking)
            cls._check_compatible(path, f, spec)
            pending = f.get(PENDING)
            missing = [n for n in names if n not in f and (pending is None or n not in pending)]
            if missing or int(f.attrs["store_version"]) != STORE_VERSION:
                marker.write_text(f"adding {len(missing)} volumes, started {time.ctime()}\n")
                _upgrade_v1(f)
                for name in missing:
                    _create_volume_dataset(f, name, spec.target_shape)
                f.flush()
                marker.unlink()
        except BaseException:
            f.close()
            raise
        return cls(path, spec, f)

    @staticmethod
    def _create(path: Path, names: list[str], spec: StoreSpec) -> None:
        def create(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.attrs["store_version"] = STORE_VERSION
                f.attrs["ctclip_version"] = spec.version
                f.attrs["target_shape"] = np.asarray(spec.target_shape, dtype="i8")
                f.attrs["config"] = json.dumps(dict(spec.config), sort_keys=True)
                if spec.shard is not None:
                    f.attrs["shard_index"], f.attrs["num_shards"] = (int(x) for x in spec.shard)
                for name in names:
                    _create_volume_dataset(f, name, spec.target_shape)
        atomic_write(path, create)  # the store appears whole or not at all

    @staticmethod
    def _check_compatible(path: Path, f: h5py.File, spec: StoreSpec) -> None:
        if VIRTUAL_SOURCES_ATTR in f.attrs:
            # writing into it would write through the virtual datasets into the shard stores
            raise StoreError(f"{path}: is a merged virtual store (views into shard stores); preprocess into the "
                             "shard stores and merge again, or write another output file")
        version = int(f.attrs.get("store_version", -1))
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{path}: store version {version}, this code writes {STORE_VERSION}; use --overwrite")
        shape = tuple(int(x) for x in f.attrs["target_shape"])
        if shape != tuple(spec.target_shape):
            raise StoreError(f"{path}: holds volumes of shape {shape}, asked for {tuple(spec.target_shape)}; "
                             "use another output file or --overwrite")
        stored = json.loads(f.attrs["config"])
        wanted = json.loads(json.dumps(dict(spec.config), sort_keys=True))
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if diff:
            raise StoreError(f"{path}: was written with a different preprocessing config ({', '.join(diff)} "
                             "differ); use another output file or --overwrite")
        stored, wanted = store_shard(f.attrs), None if spec.shard is None else tuple(int(x) for x in spec.shard)
        if stored != wanted:
            raise StoreError(f"{path}: holds {_shard_label(stored)}, asked for {_shard_label(wanted)}; "
                             "use another output file or --overwrite")

    def is_complete(self, name: str) -> bool:
        obj = self._f.get(name)
        return isinstance(obj, h5py.Dataset) and int(obj.attrs["complete"]) == 1

    def pending(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if not self.is_complete(n)]

    def commit(self, name: str, volume: np.ndarray, attrs: Mapping[str, Any]) -> None:
        """Write one volume and its attributes; it appears under its name only at the end."""
        pending = self._f.require_group(PENDING)
        if name in self._f:  # rewriting a done volume (not done by the pipeline): back to pending first
            self._f[name].attrs.modify("complete", np.uint8(0))
            self._f.flush()
            self._link(f"/{name}", f"/{PENDING}/{name}", name)
        if name not in pending:
            raise StoreError(f"{self.path}: no dataset allocated for {name!r} (open the writer with its name)")
        ds = pending[name]
        if volume.shape != ds.shape or volume.dtype != np.uint8:
            raise StoreError(f"{name}: got {volume.dtype} {volume.shape}, the store holds uint8 {ds.shape}")
        unknown = set(attrs) - (set(VOLUME_ATTRS) - {"complete"})
        if unknown:
            raise StoreError(f"{name}: unknown volume attributes {sorted(unknown)}")
        ds.write_direct(np.ascontiguousarray(volume))
        for key, value in attrs.items():
            if key in STR_ATTR_SIZES:
                ds.attrs.modify(key, np.bytes_(_encode(str(value), STR_ATTR_SIZES[key], f"{name}: {key}")))
            else:
                shape, dtype = NUM_ATTRS[key]
                arr = np.asarray(value, dtype=dtype)
                if arr.shape != shape:
                    raise StoreError(f"{name}: attribute {key} has shape {arr.shape}, expected {shape}")
                ds.attrs.modify(key, arr)
        self._f.flush()  # data and attributes on disk before the volume is declared complete
        ds.attrs.modify("complete", np.uint8(1))
        self._f.flush()
        self._link(f"/{PENDING}/{name}", f"/{name}", name)

    def _link(self, source: str, dest: str, name: str) -> None:
        """Move a dataset's link; the marker says which volume was moving if the process dies meanwhile."""
        marker = _marker(self.path, "linking")
        marker.write_text(name)
        self._f.move(source, dest)
        self._f.flush()
        marker.unlink()

    def close(self) -> None:
        """Close the store; an empty /_pending group goes, so a finished store holds volumes only."""
        if self._f:
            try:
                if PENDING in self._f and len(self._f[PENDING]) == 0:
                    marker = _marker(self.path, "linking")
                    marker.write_text(PENDING)
                    del self._f[PENDING]
                    self._f.flush()
                    marker.unlink()
            finally:
                self._f.close()
                self._f = None  # type: ignore[assignment]

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

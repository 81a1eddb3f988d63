"""HDF5 store of preprocessed uint8 CT volumes: one dataset per VolumeName, chunked by slice.

Crash safety without a journal: a store is created complete-but-empty (every dataset of the run,
with its full file space and every attribute already allocated) in a temporary file that is renamed
into place. Datasets not yet done wait in the ``/_pending`` group, out of the volumes' namespace, so
``h5py.File(store)[name]`` (how plain h5py users and the seed's code read) only ever finds a finished
volume. Committing a volume writes raw data into space that already exists, rewrites fixed-size
attributes in place, sets `complete` to 1 in a second flush, and only then moves the dataset's link
from ``/_pending/<name>`` to ``/<name>`` (a metadata-only step guarded by a ``.linking`` marker file: a
process killed inside that step leaves the marker, and the next writer checks the store before going
on). A process killed at any moment therefore leaves a store in which every volume is either
complete under its own name or still pending. Re-running the preprocessing redoes the pending ones and
gives the same store as an uninterrupted run. A volume that failed stays pending (its name is in the
run's errors CSV).

Adding volumes to an existing store (a later run over a larger folder) creates their datasets in
place; that short, metadata-only step is guarded by a marker file so an interrupted extension is
detected on the next run.

Layout (h5py view)::

    /<VolumeName>              uint8 (D, H, W), chunks (1, H, W), no compression; only complete volumes
        attrs: complete (1), source_path, original_shape (3,), spacing (3,), affine (4, 4),
               hu_slope, hu_intercept, rescale ("csv"|"nifti"|"none"), rescale_reason,
               orientation (on-disk axis codes), uint8_range (HU mapped to 0 and 255),
               output_spacing (mm per stored voxel, D H W), content_start / content_shape (where
               the resized volume sits inside the padding)
    /_pending/<VolumeName>     the same, for volumes not yet done (complete 0); the group is removed
                               when a writer closes with nothing pending
    file attrs: store_version, ctclip_version, target_shape, config (JSON of the preprocessing
                config, with `axis_codes`: the stored layout, see `store_axis_codes`); a shard store (scripts/ctclip_preprocess.py --num_shards) also has
                shard_index and num_shards; a merged virtual store (ctclip/data/shards.py) has
                virtual_sources (JSON list of the shard stores, relative to its own folder)

Version 1 stores (before 2026-12) kept pending datasets beside the complete ones: their readers must check
``attrs["complete"] == 1`` (`VolumeStore` does); a writer moves their pending datasets on first open.

A merged virtual store holds no voxels: its datasets are HDF5 virtual datasets that read from the
shard stores beside it. HDF5 reads a missing source file as zeros without an error, so `VolumeStore`
checks that every shard store is there when it opens the file, and that a volume is still complete
in its shard before the first read of it; `StoreWriter` refuses to write into such a store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ctcore.atomic import atomic_write

STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
PENDING = "_pending"
# what stores written before layouts were configurable recorded as "layout" (the radiological view)
LEGACY_LAYOUT = "D: inferior->superior (b2u) | H: anterior->posterior | W: right->left (radiological)"
_STR_SIZES = {"source_path": 4096, "rescale": 16, "rescale_reason": 256, "orientation": 8}
_NUM_ATTRS: dict[str, tuple[tuple[int, ...], str]] = {
    "original_shape": ((3,), "i8"),
    "spacing": ((3,), "f8"),
    "affine": ((4, 4), "f8"),
    "hu_slope": ((), "f8"),
    "hu_intercept": ((), "f8"),
    "uint8_range": ((2,), "f8"),
    "output_spacing": ((3,), "f8"),
    "content_start": ((3,), "i8"),
    "content_shape": ((3,), "i8"),
}
VOLUME_ATTRS = ("complete", *_STR_SIZES, *_NUM_ATTRS)
SHARD_ATTRS = ("shard_index", "num_shards")
VIRTUAL_SOURCES_ATTR = "virtual_sources"


class StoreError(RuntimeError):
    """The store cannot be used as asked (wrong shape or config, interrupted extension, ...)."""


def _placeholder_attrs(ds: h5py.Dataset) -> None:
    ds.attrs.create("complete", 0, dtype="u1")
    for key, size in _STR_SIZES.items():
        ds.attrs.create(key, b"", dtype=f"S{size}")
    for key, (shape, dtype) in _NUM_ATTRS.items():
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


def _decode(value: Any) -> Any:
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def store_axis_codes(config: Mapping[str, Any]) -> str:
    """The stored layout of a store, as axis codes of its (D, H, W) arrays (ctclip.data.preprocess),
    from its config attribute; stores written before the layout was recorded were radiological."""
    if "axis_codes" in config:
        return str(config["axis_codes"])
    if config.get("layout") == LEGACY_LAYOUT:
        return ("S" if config.get("slide_b2u", True) else "I") + "PL"
    raise StoreError(f"the store's config records no layout ({sorted(config)}); it was not written by "
                     "ctclip_preprocess.py")


@dataclass(frozen=True)
class StoreSpec:
    target_shape: tuple[int, int, int]
    config: Mapping[str, Any]  # the resolved preprocessing config, compared on resume
    version: str = ""
    shard: tuple[int, int] | None = None  # (shard_index, num_shards) of a shard store, compared on resume


def store_shard(attrs: Mapping[str, Any]) -> tuple[int, int] | None:
    """(shard_index, num_shards) from a store's file attributes; None for an unsharded store."""
    if "num_shards" not in attrs:
        return None
    return int(attrs["shard_index"]), int(attrs["num_shards"])


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
            if key in _STR_SIZES:
                ds.attrs.modify(key, np.bytes_(_encode(str(value), _STR_SIZES[key], f"{name}: {key}")))
            else:
                shape, dtype = _NUM_ATTRS[key]
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


class VolumeStore:
    """Read-only view of the complete volumes of a store. Opens the file lazily, once per process,
    so an instance can be handed to DataLoader workers (fork or spawn) before any read. The set of
    complete volumes is read once per process (a snapshot: reopen to see volumes committed later)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: h5py.File | None = None
        self._pid: int | None = None
        self._names: list[str] | None = None
        self._complete: frozenset[str] = frozenset()
        self._datasets: dict[str, h5py.Dataset] = {}
        self._sources: dict[str, h5py.File] = {}  # merged virtual store: its shard stores, by relative path

    @property
    def file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            # a handle inherited through fork is never reused: each process opens its own
            f = h5py.File(self.path, "r")
            try:
                self._check_virtual_sources(f)
            except BaseException:
                f.close()
                raise
            self._f = f
            self._pid = os.getpid()
            self._datasets = {}
            self._sources = {}
        return self._f

    def _check_virtual_sources(self, f: h5py.File) -> None:
        if VIRTUAL_SOURCES_ATTR not in f.attrs:
            return
        missing = [s for s in json.loads(f.attrs[VIRTUAL_SOURCES_ATTR]) if not (self.path.parent / s).is_file()]
        if missing:
            raise StoreError(f"{self.path}: merged virtual store whose shard store(s) {', '.join(missing)} are missing "
                             f"(paths are relative to {self.path.parent}); HDF5 would read their volumes as zeros. "
                             "Keep the shard stores beside it, or merge with --mode copy")

    def _check_virtual_volume(self, name: str, ds: h5py.Dataset) -> None:
        """A virtual volume is only as complete as the shard it points into (which may have been rebuilt)."""
        for src in ds.virtual_sources():
            handle = self._sources.get(src.file_name)
            if handle is None:
                handle = self._sources[src.file_name] = h5py.File(self.path.parent / src.file_name, "r")
            obj = handle.get(src.dset_name)
            if not isinstance(obj, h5py.Dataset) or int(obj.attrs.get("complete", 0)) != 1 or obj.shape != ds.shape:
                raise StoreError(f"{self.path}: volume {name!r} points into {src.file_name}, where it is no longer "
                                 "a complete volume (the shard store changed after merging); merge again")

    def names(self) -> list[str]:
        """Names of complete volumes, sorted."""
        if self._names is None:
            f = self.file
            self._names = sorted(n for n, obj in f.items()
                                 if isinstance(obj, h5py.Dataset) and int(obj.attrs.get("complete", 0)) == 1)
        if not self._complete:
            self._complete = frozenset(self._names)
        return self._names

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        self.names()
        return name in self._complete

    def _dataset(self, name: str) -> h5py.Dataset:
        f = self.file  # (re)opens after fork, which also clears the cache
        if name not in self:
            raise KeyError(f"{self.path}: no complete volume named {name!r}")
        ds = self._datasets.get(name)
        if ds is None:
            ds = f[name]
            if ds.is_virtual:
                self._check_virtual_volume(name, ds)
            self._datasets[name] = ds
        return ds

    def read(self, name: str) -> np.ndarray:
        """One volume as a uint8 array (D, H, W); nothing else is loaded."""
        ds = self._dataset(name)
        return self.read_into(name, np.empty(ds.shape, dtype=np.uint8))

    def tensor(self, name: str):
        """One volume as a uint8 torch tensor (D, H, W), sharing memory with the array read."""
        import torch

        return torch.from_numpy(self.read(name))

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Read one volume straight into `out` (uint8, the volume's shape): one copy, no temporary."""
        self._dataset(name).read_direct(out)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._dataset(name).shape)

    def attrs(self, name: str) -> dict[str, Any]:
        return {k: _decode(v) for k, v in self._dataset(name).attrs.items()}

    def file_attrs(self) -> dict[str, Any]:
        out = {k: _decode(v) for k, v in self.file.attrs.items()}
        out["config"] = json.loads(out["config"])
        return out

    def axis_codes(self) -> str:
        """The stored layout of this store's volumes (see `store_axis_codes`)."""
        try:
            return store_axis_codes(self.file_attrs()["config"])
        except StoreError as e:
            raise StoreError(f"{self.path}: {e}") from None

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            for handle in self._sources.values():
                handle.close()
            self._f.close()
        self._f, self._pid, self._datasets, self._sources = None, None, {}, {}

    def __getstate__(self) -> dict[str, Any]:
        # pickled into spawned workers without the handles
        state = dict(self.__dict__)
        state.update(_f=None, _pid=None, _datasets={}, _sources={})
        return state

    def __enter__(self) -> VolumeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

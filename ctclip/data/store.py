"""HDF5 store of preprocessed uint8 CT volumes: one dataset per VolumeName, chunked by slice. This
module holds the layout and the reader (`VolumeStore`); `ctclip.data.store_writer.StoreWriter` is the
one writer, and says how a store survives a killed process.

Datasets not yet done wait in the ``/_pending`` group, out of the volumes' namespace, so
``h5py.File(store)[name]`` (how plain h5py users and the seed's code read) only ever finds a finished
volume: a process killed at any moment leaves a store in which every volume is either complete under
its own name or still pending.

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
                shard_index and num_shards; a merged virtual store (ctclip/run/merge_stores.py) has
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

STORE_VERSION = 2
READABLE_VERSIONS = (1, 2)
PENDING = "_pending"
# what stores written before layouts were configurable recorded as "layout" (the radiological view)
LEGACY_LAYOUT = "D: inferior->superior (b2u) | H: anterior->posterior | W: right->left (radiological)"
STR_ATTR_SIZES = {"source_path": 4096, "rescale": 16, "rescale_reason": 256, "orientation": 8}
NUM_ATTRS: dict[str, tuple[tuple[int, ...], str]] = {
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
VOLUME_ATTRS = ("complete", *STR_ATTR_SIZES, *NUM_ATTRS)
SHARD_ATTRS = ("shard_index", "num_shards")
VIRTUAL_SOURCES_ATTR = "virtual_sources"


class StoreError(RuntimeError):
    """The store cannot be used as asked (wrong shape or config, interrupted extension, ...)."""


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


def store_shard(attrs: Mapping[str, Any]) -> tuple[int, int] | None:
    """(shard_index, num_shards) from a store's file attributes; None for an unsharded store."""
    if "num_shards" not in attrs:
        return None
    return int(attrs["shard_index"]), int(attrs["num_shards"])


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

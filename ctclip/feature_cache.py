"""Slice-embedding cache for training with a frozen backbone (`--freeze_dinov2 --cache_features`).

With the slice encoder frozen, its output for a volume never changes, so it is computed once and
training reads (D, C) float32 slice embeddings instead of running the ViT on every slice of every
volume in every epoch. The cache is keyed by the backbone and its weights' checksum, the encoder's
input size and the preprocessing of the store, so a different model or store never reads stale
features. Each rank encodes its share of the missing volumes into its own part file (written under a
temporary name, renamed when complete); readers open every part, so a changed world size or an
interrupted build only recomputes what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ctclip.data.dataset import CTReportDataset, make_loader
from ctclip.data.store import VolumeStore
from ctcore.atomic import atomic_write

CACHE_VERSION = 1


def cache_key(model, store_path: Path) -> str:
    with VolumeStore(store_path) as store:
        prep = store.file_attrs()
    blob = json.dumps({"encoder": model.slice_encoder_id(), "image_size": model.cfg.image_size,
                       "preprocessing": prep.get("config"), "target_shape": prep.get("target_shape"),
                       "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dir(store_path: Path, key: str) -> Path:
    return store_path.with_name(store_path.name + ".features") / key


class FeatureCache:
    """Reader over all complete part files of one cache folder; opened lazily per process."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._pid: int | None = None
        self._files: list[h5py.File] = []
        self._where: dict[str, int] = {}

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self._files = [h5py.File(p, "r") for p in sorted(self.folder.glob("part-*.h5"))]
        self._where = {name: i for i, f in enumerate(self._files) for name in f}
        self._pid = os.getpid()

    def names(self) -> set[str]:
        self._open()
        return set(self._where)

    def read(self, name: str) -> np.ndarray:
        self._open()
        return self._files[self._where[name]][name][()]

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files:
                f.close()
        self._files, self._where, self._pid = [], {}, None

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_pid": None, "_files": [], "_where": {}}


@torch.inference_mode()
def build_feature_cache(model, dataset: CTReportDataset, folder: Path, rank: int, world_size: int,
                        device: torch.device, batch_size: int, num_workers: int,
                        autocast: Callable = contextlib.nullcontext, barrier: Callable[[], None] = lambda: None) -> int:
    """Encode the slices of every volume of `dataset` not yet cached; returns how many this rank did."""
    folder.mkdir(parents=True, exist_ok=True)
    reader = FeatureCache(folder)
    done = reader.names()
    reader.close()
    todo = [i for i, n in enumerate(dataset.names) if n not in done][rank::world_size]
    if todo:
        subset = torch.utils.data.Subset(dataset, todo)
        loader = make_loader(subset, batch_size=batch_size, num_workers=num_workers)
        names = iter([dataset.names[i] for i in todo])

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                for volumes, _ in loader:
                    with autocast():
                        feats = model.encode_slices(volumes.to(device)).float().cpu().numpy()
                    for row in feats:
                        f.create_dataset(next(names), data=row)
        atomic_write(folder / f"part-{uuid.uuid4().hex}.h5", write)
    barrier()
    return len(todo)


class CachedReportDataset(Dataset):
    """(slice embeddings (D, C) float32, text) for the volumes of a CTReportDataset."""

    def __init__(self, base: CTReportDataset, cache: FeatureCache):
        self.base, self.names, self.texts, self.cache = base, base.names, base.texts, cache
        missing = [n for n in self.names if n not in cache.names()]
        if missing:
            raise RuntimeError(f"feature cache {cache.folder} lacks {len(missing)} volumes (e.g. {missing[0]})")
        cache.close()

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        # the base dataset's text: with sentence sampling it is drawn per epoch
        return torch.from_numpy(self.cache.read(self.names[index])), self.base.target(index)

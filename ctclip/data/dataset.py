"""PyTorch datasets over the HDF5 store: (volume, report text) pairs and (volume, 18 labels).

The store file is never opened in the constructor's process for longer than it takes to list the
volumes; each DataLoader worker opens its own handle on first use (`VolumeStore` reopens after fork
and pickles without the handle for spawn), so persistent workers and both start methods are safe.
Volumes stay uint8 until the model needs floats.

Batches without extra copies: `__getitems__` reads a whole batch straight from HDF5 into one uint8
buffer, allocated in shared memory when it runs in a DataLoader worker, and `collate_volumes`
returns that buffer as the batch instead of stacking copies. The worker then hands the batch to the
main process as a shared-memory handle, so a volume is copied once (HDF5 -> batch), as in a plain
h5py read. `make_loader` wires this up; the default collate works too, with one more copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ctclip.data.augment import random_shift
from ctclip.data.reports import (
    load_labels,
    load_reports,
    report_text,
    sample_sentences,
    split_sentences,
    text_columns,
)
from ctclip.data.store import VolumeStore

log = logging.getLogger(__name__)


def _list_complete(store_path: Path) -> list[str]:
    with VolumeStore(store_path) as store:
        return store.names()


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 tensor of `shape`, in shared memory when called inside a DataLoader worker."""
    numel = int(np.prod(shape))
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(numel)  # what default_collate itself uses for batches
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def collate_volumes(samples: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Collate (volume, target) samples. Volumes that are consecutive views of one buffer (as
    `__getitems__` returns them) become the batch without a copy; anything else is stacked."""
    vols = [s[0] for s in samples]
    first = vols[0]
    base = first.untyped_storage()
    contiguous_run = all(v.is_contiguous() and v.untyped_storage().data_ptr() == base.data_ptr()
                         and v.storage_offset() == first.storage_offset() + i * first.numel()
                         for i, v in enumerate(vols))
    if contiguous_run:
        batch = torch.empty(0, dtype=first.dtype).set_(base, first.storage_offset(), (len(vols), *first.shape))
    else:
        batch = torch.stack(vols)
    targets = [s[1] for s in samples]
    if isinstance(targets[0], torch.Tensor):
        return batch, torch.stack(targets)
    return batch, targets


class _StoreDataset(Dataset):
    def __init__(self, store_path: str | Path):
        self.store_path = Path(store_path)
        if not self.store_path.is_file():
            raise FileNotFoundError(f"{self.store_path}: no such HDF5 store")
        self._store = VolumeStore(self.store_path)  # opened lazily, per process
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def volume(self, index: int) -> torch.Tensor:
        """uint8 tensor (1, D, H, W)."""
        return torch.from_numpy(self._store.read(self.names[index])).unsqueeze(0)

    def volumes(self, indices: list[int]) -> torch.Tensor:
        """uint8 tensor (B, 1, D, H, W) read straight into one (shared, in a worker) buffer."""
        shape = self._store.shape(self.names[indices[0]])
        batch = _batch_buffer((len(indices), 1, *shape))
        for i, index in enumerate(indices):
            self._store.read_into(self.names[index], batch[i, 0].numpy())
        return batch

    def target(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.volume(index), self.target(index)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, Any]]:
        batch = self.volumes(list(indices))
        return [(batch[i], self.target(index)) for i, index in enumerate(indices)]


class CTReportDataset(_StoreDataset):
    """Items: (uint8 tensor (1, D, H, W), report text). `names[i]` is the VolumeName of item i.

    With `sentence_keep` < 1 each item's text is a random subset of its report's sentences
    (`ctclip.data.reports.sample_sentences`), drawn from (seed, epoch, item index): the same texts for any
    number of processes or workers, and again after a resume. Call `set_epoch` before each epoch.
    With `single_sentence_rate` > 0 that share of the draws is one sentence of the report, chosen at random:
    texts the size of a zero-shot prompt. With `volume_shift` > 0 each draw of a volume is moved by up to
    that many voxels in the axial plane (`ctclip.data.augment`), drawn from the same (seed, epoch, item
    index)."""

    def __init__(self, store_path: str | Path, reports_csv: str | Path, text_column: str = "findings_impressions",
                 sentence_keep: float = 1.0, seed: int = 0, volume_shift: int = 0,
                 single_sentence_rate: float = 0.0):
        super().__init__(store_path)
        if not 0.0 < sentence_keep <= 1.0:
            raise ValueError(f"sentence_keep must be in (0, 1], got {sentence_keep}")
        if not 0.0 <= single_sentence_rate <= 1.0:
            raise ValueError(f"single_sentence_rate must be in [0, 1], got {single_sentence_rate}")
        if not isinstance(volume_shift, int) or volume_shift < 0:
            raise ValueError(f"volume_shift must be an integer >= 0, got {volume_shift!r}")
        self.sentence_keep, self.seed, self.epoch = float(sentence_keep), int(seed), 0
        self.volume_shift, self.single_sentence_rate = volume_shift, float(single_sentence_rate)
        self.columns = text_columns(text_column)
        reports = load_reports(reports_csv)
        in_store = _list_complete(self.store_path)
        have = set(reports.index)
        self.names = [n for n in in_store if n in have]
        self.n_without_report = len(in_store) - len(self.names)
        self.n_without_volume = len(have - set(in_store))
        if self.n_without_report or self.n_without_volume:
            log.warning("%s + %s: %d volumes have no report and are left out; %d reports have no volume",
                        self.store_path, reports_csv, self.n_without_report, self.n_without_volume)
        rows = reports.loc[self.names, list(self.columns)].to_dict("records")
        self.texts = [report_text(r, self.columns) for r in rows]
        self.n_empty_text = sum(1 for t in self.texts if not t)
        if self.n_empty_text:
            log.warning("%d of %d reports have an empty %s", self.n_empty_text, len(self.texts), text_column)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shift(self, volume: torch.Tensor, index: int) -> torch.Tensor:
        if self.volume_shift:
            random_shift(volume.numpy(), self.volume_shift, np.random.default_rng([self.seed, self.epoch, index, 1]))
        return volume

    def volume(self, index: int) -> torch.Tensor:
        return self._shift(super().volume(index), index)

    def volumes(self, indices: list[int]) -> torch.Tensor:
        batch = super().volumes(indices)
        if self.volume_shift:
            for i, index in enumerate(indices):  # per volume, not per slice
                self._shift(batch[i], index)
        return batch

    def target(self, index: int) -> str:
        if self.sentence_keep >= 1.0 and not self.single_sentence_rate:
            return self.texts[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.single_sentence_rate and rng.random() < self.single_sentence_rate:
            sentences = split_sentences(self.texts[index])
            return sentences[rng.integers(len(sentences))] if sentences else self.texts[index]
        return sample_sentences(self.texts[index], self.sentence_keep, rng)


class CTLabelDataset(_StoreDataset):
    """Items: (uint8 tensor (1, D, H, W), float32 tensor (18,) in FINDINGS order, NaN = unknown)."""

    def __init__(self, store_path: str | Path, labels_csv: str | Path):
        super().__init__(store_path)
        labels = load_labels(labels_csv)
        in_store = set(_list_complete(self.store_path))
        self.names = [n for n in labels.index if n in in_store]
        self.missing_volumes = [n for n in labels.index if n not in in_store]
        if self.missing_volumes:
            log.warning("%s: %d labelled volumes are not in %s (e.g. %s)", labels_csv, len(self.missing_volumes),
                        self.store_path, self.missing_volumes[0])
        self.labels = np.array(labels.loc[self.names].to_numpy(dtype=np.float32))  # writable, own memory

    def target(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.labels[index])


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 2, shuffle: bool = False,
                **kwargs: Any) -> DataLoader:
    """A DataLoader over a store dataset with the zero-copy batch path (see the module docstring)."""
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", True)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
                      collate_fn=collate_volumes, **kwargs)

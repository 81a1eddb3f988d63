"""Training data of the 2D CNNs: folds by study, the original's per-epoch draws, labelled samples.

    labels = read_labels("stage_2_train.csv")                 # hemorrhage.kaggle: SOP -> (6,) 0/1
    folds = load_or_make_folds(out / "folds.csv", studies, n_folds=5, seed=0)
    sampler = EpochDraws(series, folds_train, samples_per_study=4, seed=0, rank=0, world_size=1)
    ds = TrainSlices(series, size=256)     # item (series, slice, epoch, draw) -> uint8 (3, h, w), labels (6,)

The original drew 4 x n_studies samples per epoch: a random training study, then one of its slices
with a triangular weight (``max(1, int(min(i, n-1-i) / 4))``) that favours central slices; its code
passed ``n - 1`` and so never drew a study's last slice, which we do (weight 1). A study with several
series draws one of them at random. Slices without a label are never drawn but still serve as
neighbours. Each sample is the three slices ``[s+1, s, s-1]``, each brought to the original's 512 x 512
stacking grid and then to the input size (`hemorrhage.inputs.to_input_size`, the recipe inference uses),
then augmented (`hemorrhage.augment.augment_train`; the original's settings unless the run names another
preset) on uint8 in the DataLoader worker with a generator seeded by (seed, epoch, draw), so a resumed or
re-run epoch sees the same images. (The original augmented the 512 x 512 stack and resized to the input
size after; we augment at the input size, a quarter of the pixels at 256, which changes interpolation
detail only: crops, warps and erased boxes are fractions of the side either way.)
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ctcore.atomic import atomic_write
from hemorrhage.augment import AugmentConfig, augment_train, rng_for
from hemorrhage.inference_data import SeriesJob
from hemorrhage.inputs import neighbour_indices, to_input_size

# ----------------------------------------------------------------------------------------- folds


def make_folds(studies: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """Deterministic study -> fold: sorted unique studies, a seeded permutation, round-robin."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    uniq = sorted(set(studies))
    if len(uniq) < n_folds:
        raise ValueError(f"{len(uniq)} studies cannot fill {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    return {uniq[j]: i % n_folds for i, j in enumerate(order)}


def load_or_make_folds(path: Path, studies: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """Reuse ``folds.csv`` when it exists (every run of every fold must agree), else write it."""
    if path.is_file():
        with open(path) as f:
            folds = {r["StudyInstanceUID"]: int(r["fold"]) for r in csv.DictReader(f)}
        unknown = sorted(set(studies) - set(folds))
        if unknown:
            raise ValueError(f"{path} has no fold for {len(unknown)} studies (e.g. {unknown[0]}): the data changed "
                             "since the folds were made; use a new --output_dir or delete the file")
        if max(folds.values(), default=-1) + 1 != n_folds:
            raise ValueError(f"{path} holds {max(folds.values()) + 1} folds, not --n_folds {n_folds}")
        return folds
    folds = make_folds(studies, n_folds, seed)
    table = pd.DataFrame(sorted(folds.items()), columns=["StudyInstanceUID", "fold"])
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return folds


# ----------------------------------------------------------------------------------------- draws


def triangular_weights(n: int) -> np.ndarray:
    """The original's slice weights: max(1, int(min(i, n-1-i) / 4)) (central slices drawn more often)."""
    i = np.arange(n)
    return np.maximum(1, np.minimum(i, n - 1 - i) // 4).astype(np.float64)


@dataclass
class TrainSeries:
    job: SeriesJob
    labels: np.ndarray  # (S, 6) float32; NaN rows = unlabelled (never drawn)

    @property
    def labelled(self) -> np.ndarray:
        return ~np.isnan(self.labels[:, 0])


class EpochDraws(Sampler):
    """(series index, slice index, epoch, draw) of one epoch; ranks take every world_size-th draw."""

    def __init__(self, series: list[TrainSeries], samples_per_study: int = 4, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_draws: int | None = None) -> None:
        self.series, self.seed, self.rank, self.world = series, seed, rank, world_size
        by_study: dict[str, list[int]] = {}
        for k, s in enumerate(series):
            if s.labelled.any():
                by_study.setdefault(s.job.study_uid, []).append(k)
        self.studies = [by_study[st] for st in sorted(by_study)]
        if not self.studies:
            raise ValueError("no labelled slice to train on")
        self.weights = [triangular_weights(s.job.n_slices) * s.labelled for s in series]
        total = samples_per_study * len(self.studies)
        self.n_draws = min(total, max_draws) if max_draws else total
        self.epoch = 0
        self.start = 0  # draws of this rank already done in this epoch (a resume mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw `epoch`'s order; `start`: skip this rank's first `start` draws (they were trained on)."""
        self.epoch, self.start = epoch, start

    def draws(self) -> list[tuple[int, int, int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        out = []
        for key in range(self.n_draws):
            study = self.studies[rng.integers(len(self.studies))]
            k = study[rng.integers(len(study))] if len(study) > 1 else study[0]
            w = self.weights[k]
            out.append((k, int(rng.choice(len(w), p=w / w.sum())), self.epoch, key))
        return out

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        return iter(self.draws()[self.rank::self.world][self.start:])

    def __len__(self) -> int:
        return max(0, len(range(self.rank, self.n_draws, self.world)) - self.start)


# ----------------------------------------------------------------------------------------- images


def npz_images(path: str) -> np.ndarray:
    """The ``images`` stack of an npz: memory-mapped when stored uncompressed (hemorrhage_prepare's default),
    so a sample reads its three slices only; loaded whole when deflated."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("images.npy")
        stored = info.compress_type == zipfile.ZIP_STORED
    if not stored:
        with np.load(path, allow_pickle=False) as z:
            return z["images"]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: unsupported .npy format version {version} for images")
        offset = f.tell()
    if fortran or dtype != np.uint8:
        raise ValueError(f"{path}: images must be a C-ordered uint8 array, found {dtype} (fortran={fortran})")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)


class TrainSlices(Dataset):
    """Augmented uint8 samples; each worker opens (memory-maps) a series' stack the first time it needs it."""

    def __init__(self, series: list[TrainSeries], size: int, seed: int = 0, augment: AugmentConfig | None = None
                 ) -> None:
        self.series, self.size, self.seed = series, size, seed
        self.augment = augment or AugmentConfig()
        self._stacks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sum(s.job.n_slices for s in self.series)

    def _slices(self, k: int, idx: np.ndarray) -> list[np.ndarray]:
        job = self.series[k].job
        if job.kind == "npz":
            if k not in self._stacks:
                self._stacks[k] = npz_images(job.npz)
            return [np.asarray(self._stacks[k][i]) for i in idx]
        out = []
        for i in idx:
            img = cv2.imread(job.paths[i], cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise OSError(f"cannot read {job.paths[i]}")
            out.append(img)
        return out

    def __getitem__(self, draw: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        k, s, epoch, key = draw
        idx = neighbour_indices(self.series[k].job.n_slices)[s]
        imgs = [to_input_size(im, self.size) for im in self._slices(k, idx)]
        if imgs[0].ndim == 3:
            raise ValueError("three-window images: train on single-window data (the neighbours are the channels)")
        x = augment_train(np.stack(imgs, -1), rng_for(self.seed, epoch, key), self.augment)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.tensor(self.series[k].labels[s])

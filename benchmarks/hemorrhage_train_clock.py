"""The clock of benchmarks/bench_hemorrhage_train.py: when training's loop asked for each batch and got it.

    with probe_training_loader(device) as probe:        # or replay=batches: hand those out instead
        run_training(cfg)                                # hemorrhage.run.train_cnn, unmodified
    images_per_s, wait_share = probe.epochs[0].rate(*measured_window(warmup, steps, workers)[:2])
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

import hemorrhage.run.train_cnn as train_cnn
from hemorrhage.train_data import TrainSlices


@dataclass
class EpochClock:
    """When the loop asked for each batch of one pass and when it got it (time.perf_counter seconds)."""

    asked: list[float] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def rate(self, first: int, last: int) -> tuple[float, float]:
        """(images/s, share of the time spent waiting for a batch) from the arrival of batch `first` to that of
        batch `last` (0-based): the loop consumed batches first..last-1 in that time (a pure producer made
        as many)."""
        if not 0 <= first < last < len(self.arrived):
            raise ValueError(f"batches {first}..{last} of {len(self.arrived)}")
        seconds = self.arrived[last] - self.arrived[first]
        wait = sum(self.arrived[i] - self.asked[i] for i in range(first + 1, last + 1))
        return sum(self.sizes[first:last]) / seconds, wait / seconds

    def first_batch_s(self) -> float:
        return self.arrived[0] - self.asked[0]


def measured_window(warmup: int, steps: int, workers: int) -> tuple[int, int, int]:
    """(first, last, batches per epoch): `warmup` batches left out, then whole rounds of the W = max(workers, 1)
    workers, at least `steps` batches. Batch i comes from worker i mod W, and a worker's batches arrive a worker's
    production time apart, but the W workers' batches arrive close together (in bursts); from one batch to a later
    batch of the same worker holds whole rounds, so bursts do not bias the rate."""
    period = max(workers, 1)
    first = max(warmup, period)
    last = first + math.ceil(steps / period) * period
    return first, last, last + 1


def clocked(batches: Iterable, clock: EpochClock, device: torch.device) -> Iterator:
    """Yield `batches`, recording into `clock`."""
    for_sync = device.type == "cuda"
    it = iter(batches)
    while True:
        if for_sync:  # the loop already waits for every step (float(loss)); this makes it certain
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        clock.asked.append(t)
        clock.arrived.append(time.perf_counter())
        clock.sizes.append(len(batch[0]))
        yield batch


@dataclass
class LoaderProbe:
    """What the patched DataLoader saw during one run_training call."""

    device: torch.device
    replay: list | None = None  # batches handed out instead of the loader's own
    loader: DataLoader | None = None  # the training DataLoader run_training built
    epochs: list[EpochClock] = field(default_factory=list)


@contextlib.contextmanager
def probe_training_loader(device: torch.device, replay: list | None = None) -> Iterator[LoaderProbe]:
    """While active, run_training's DataLoaders are a subclass whose TrainSlices loader clocks every epoch
    (and, given `replay`, hands out those batches instead of loading). Other loaders behave as usual.

    A refactor of hemorrhage/run/train_cnn.py that exposed the loader builder and the step would make this
    unnecessary (see the report that came with this script)."""
    probe = LoaderProbe(device, replay)

    class ClockedDataLoader(DataLoader):
        def __iter__(self):
            if not isinstance(self.dataset, TrainSlices):
                return super().__iter__()
            probe.loader = self
            probe.epochs.append(EpochClock())
            source = probe.replay if probe.replay is not None else super().__iter__()
            return clocked(source, probe.epochs[-1], probe.device)

    saved = train_cnn.DataLoader
    train_cnn.DataLoader = ClockedDataLoader
    try:
        yield probe
    finally:
        train_cnn.DataLoader = saved
    if probe.loader is None:
        raise RuntimeError("run_training built no TrainSlices DataLoader through hemorrhage.run.train_cnn.DataLoader: "
                           "the training code changed; update benchmarks/bench_hemorrhage_train.py")

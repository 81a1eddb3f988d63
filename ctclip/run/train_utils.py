"""Pieces of the training loop that are not the loop: precision, schedule, data order, logging."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler


def cosine_with_warmup(warmup_steps: int, total_steps: int,
                       budget_progress: Callable[[], float] | None = None) -> Callable[[int], float]:
    """LR multiplier: linear warmup from ~0 to 1, then cosine to 0 at total_steps.

    With `budget_progress` (the used share of a time budget, 0..1) the cosine follows whichever of
    steps and budget is further along, so a run stopped by its budget ends at a low learning rate
    instead of being cut off at its peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if budget_progress is not None:
            progress = max(progress, min(1.0, budget_progress()))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


BUDGET_CLOCKS = ("cpu", "wall")


class BudgetClock:
    """Seconds a training run has used of its budget (`--max_minutes`, `--budget_clock`).

    cpu: `time.process_time()`, user + system time of every thread of this process (DataLoader worker
    processes are not counted: budgeted runs should use --num_workers 0); robust to other jobs on a
    shared machine, and on N threads it runs out N times faster than the wall clock. wall:
    `time.perf_counter()`. Spans inside `paused()` (validation) are not counted. `used` carries the
    seconds of earlier runs over a resume. Without a budget (`minutes` None) it only measures."""

    def __init__(self, minutes: float | None, kind: str = "cpu", used: float = 0.0):
        if kind not in BUDGET_CLOCKS:
            raise ValueError(f"--budget_clock must be one of {', '.join(BUDGET_CLOCKS)}, got {kind!r}")
        if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
            raise ValueError(f"--max_minutes must be a positive number, got {minutes!r}")
        self.limit_s = None if minutes is None else 60.0 * minutes
        self.kind = kind
        self._now = time.process_time if kind == "cpu" else time.perf_counter
        self._start = self._now() - used
        self._shared_used: float | None = None  # rank 0's reading in a distributed run (see share)
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def used(self) -> float:
        """Budget seconds used so far (rank 0's reading after `share`)."""
        return self._shared_used if self._shared_used is not None else self._now() - self._start

    def share(self, broadcast: Callable[[Any], Any]) -> None:
        """Take rank 0's reading on every rank, so that all ranks follow one schedule and stop together."""
        self._shared_used = None
        self._shared_used = float(broadcast(self.used()))

    def progress(self) -> float:
        return 0.0 if self.limit_s is None else self.used() / self.limit_s

    def exhausted(self) -> bool:
        return self.limit_s is not None and self.used() >= self.limit_s

    def cpu_minutes(self) -> float:
        """CPU minutes of this process since the clock was made (validation included)."""
        return (time.process_time() - self.cpu0) / 60.0

    def wall_minutes(self) -> float:
        return (time.perf_counter() - self.wall0) / 60.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = self._now()
        try:
            yield
        finally:
            self._start += self._now() - t0


class GlobalBatchSampler(Sampler[list[int]]):
    """Micro-batches of this rank, in an order that does not depend on the number of processes.

    Each epoch is one seeded permutation of the dataset. Optimizer step s takes the global batch
    perm[s*B:(s+1)*B]; it is cut into `micro_batches` consecutive micro-batches, and each of those
    into `world_size` consecutive per-rank parts. So the samples seen by an optimizer step, and their
    order within it, are the same for any world size and accumulation. `start_step` skips the steps
    already done in the current epoch (resume mid-epoch)."""

    def __init__(self, n: int, global_batch: int, micro_batches: int, world_size: int, rank: int, seed: int):
        if global_batch % (micro_batches * world_size):
            raise ValueError(f"--batch_size {global_batch} must be divisible by grad_accum x processes "
                             f"= {micro_batches} x {world_size}")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} pairs, fewer than one batch of {global_batch}")
        self.n, self.batch, self.k, self.world, self.rank, self.seed = n, global_batch, micro_batches, world_size, rank, seed
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch

    @property
    def rank_batch(self) -> int:
        """Samples per micro-batch on one rank (at least 1): also the batch for encoding outside training."""
        return max(1, self.batch // (self.k * self.world))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.k

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        micro = self.batch // self.k
        part = micro // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            for k in range(self.k):
                start = step * self.batch + k * micro + self.rank * part
                yield perm[start:start + part]


class RunLog:
    """train_log.jsonl (+ TensorBoard) on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "train_log.jsonl"
        self._tb = self._fh = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a")  # one line per record, flushed: a killed run keeps what it logged
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        step = record.get("step", 0)
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._fh.close()


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux: KiB)


class Throughput:
    def __init__(self) -> None:
        self.t, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return r

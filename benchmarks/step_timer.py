"""Timing shared by the step benchmarks (bench_tiny_cnn.py, bench_text_pool.py): training steps as process CPU
time and wall time, arms interleaved over repeats, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch


def time_steps(params: Iterable[torch.nn.Parameter], loss: Callable[[], torch.Tensor], steps: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per training step (`loss()`, backward, AdamW), after one untimed step."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    for i in range(steps + 1):
        if i == 1:
            cpu, wall = time.process_time(), time.perf_counter()
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def interleaved(arms: dict[str, Callable[[], tuple[float, float]]], repeats: int
                ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, tuple[float, float]]]:
    """Each arm (a callable timing one round) run `repeats` times, the arms taking turns: (all rounds, the
    median CPU and wall seconds per arm)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, round_ in arms.items():
            runs[name].append(round_())
    med = {n: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r)) for n, r in runs.items()}
    return runs, med


def print_table(first_column: str, med: dict[str, tuple[float, float]]) -> None:
    print(f"| {first_column} | CPU s / step | wall s / step |\n|---|---|---|")
    for name, (c, w) in med.items():
        print(f"| {name} | {c:.3f} | {w:.3f} |")

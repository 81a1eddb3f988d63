"""Run a test function in N real processes with a gloo process group on CPU.

    from tests.ddp_utils import run_distributed

    def _check(rank: int, world_size: int, x: float) -> None:   # module level, so it pickles
        ...asserts; torch.distributed is initialised...

    def test_something():
        run_distributed(_check, 2, 3.0)

The ranks are fresh processes (torch.multiprocessing's "forkserver" start method where the platform
has it, else "spawn"): no threads, open files or modules of the test process leak into them; they
get its ``sys.path``. The fork server imports torch once per session, so a 2-rank test costs about
a second instead of a torch import per rank. Each child gets the torchrun variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT), so code under test can call
``init_distributed`` itself (``init_group=False``).
An exception in any child fails the calling test with the tracebacks of all failed ranks, earliest
first; ranks still running are terminated. Collectives time out after ``timeout_s`` and the whole run
after ``run_timeout_s``, instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once by the fork server instead of by every rank of every test. torch._dynamo is what
# DistributedDataParallel's constructor pulls in (with sympy): seconds per process otherwise.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo"]
_GRACE_S = 5.0  # after one rank fails, time the others get to report their own error


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    init_group: bool,
    timeout_s: float,
    args: tuple[Any, ...],
    errors: Any,
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Several ranks on a small CPU box: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        if init_group:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        fn(rank, world_size, *args)
    except BaseException:
        errors.put((time.time(), rank, traceback.format_exc()))
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init_group: bool = True,
    timeout_s: float = 60.0,
    run_timeout_s: float = 240.0,
) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; raise if any fails.

    ``fn`` and ``args`` must be picklable (a module-level function). With ``init_group`` a gloo
    process group (collective timeout ``timeout_s``) is initialised before ``fn`` runs; it is
    destroyed afterwards in any case. When a rank fails, the others get a few seconds to finish or
    fail on their own, then are terminated; the AssertionError lists every rank's traceback, the
    earliest failure (usually the root cause, the rest being "connection closed by peer") first.
    The whole run is killed after ``run_timeout_s``. If the rendezvous port was taken by someone
    else between picking and binding it, the run is repeated on a new port (twice at most).
    """
    for attempt in range(3):
        problems = _run_once(fn, world_size, args, init_group, timeout_s, run_timeout_s)
        if not (attempt < 2 and any("address already in use" in p.lower() for p in problems)):
            break
    if problems:
        raise AssertionError(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(problems))


def _run_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    init_group: bool,
    timeout_s: float,
    run_timeout_s: float,
) -> list[str]:
    """Spawn the ranks once; the problems found (tracebacks, bad exit codes, timeout), earliest first."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Takes effect if this call starts the (per-session) fork server; harmless otherwise.
        ctx.set_forkserver_preload(_PRELOAD)
    else:
        ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, fn, world_size, port, init_group, timeout_s, args, errors),
            name=f"{fn.__name__}-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    reports: list[tuple[float, int, str]] = []
    deadline = time.monotonic() + run_timeout_s
    first_failure: float | None = None
    timed_out = False
    while any(proc.is_alive() for proc in procs):
        while not errors.empty():
            reports.append(errors.get())
        now = time.monotonic()
        if first_failure is None and any(proc.exitcode not in (None, 0) for proc in procs):
            first_failure = now
        if now > deadline or (first_failure is not None and now - first_failure > _GRACE_S):
            timed_out = now > deadline
            break
        time.sleep(0.05)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    while not errors.empty():
        reports.append(errors.get())

    reported = {rank for _, rank, _ in reports}
    problems = [f"rank {rank}:\n{tb}" for _, rank, tb in sorted(reports)]
    problems += [
        f"rank {rank}: "
        + (f"killed by signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit code {proc.exitcode}")
        + " without a Python traceback"
        for rank, proc in enumerate(procs)
        if proc.exitcode != 0 and rank not in reported
    ]
    if timed_out:
        problems.insert(0, f"timed out after {run_timeout_s:.0f} s")
    return problems

"""Training that survives a time limit: SIGTERM / SIGUSR1 ask a run to stop after its current step.

    with stop_on_signals() as stop:
        for batch in batches:
            step(batch)
            if stop.agreed(device):   # every rank, every step: the same answer on all of them
                save_checkpoint(...)  # rank 0
                return ...            # the script exits with EXIT_PREEMPTED

Slurm sends SIGUSR1 at `sbatch --signal=USR1@<seconds>` before the time limit, and SIGTERM at the limit
or on preemption (then SIGKILL after KillWait). The handlers only set a flag: the step that is running
finishes, the checkpoint is written (through ctcore.atomic, so a SIGKILL during the save leaves the
previous file), and a second signal changes nothing. In a distributed run a signal may reach some
ranks only, or reach them between different steps, so `agreed` takes the MAX of the flag over the
ranks (one all_reduce of one number per step): every rank stops after the same step.

Processes forked while the handlers are installed (DataLoader workers) inherit them: a worker that
gets the signal too keeps serving until the loop stops instead of dying under the step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence

import torch

from ctcore.distributed import is_initialized

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL, "try again later": stopped by a signal after a checkpoint; resumable
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The flag the handlers set; `signum` is the first signal received (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:  # the handler: nothing but the flag
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        """This process received a stop signal."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank received a stop signal (MAX over ranks); this process's flag without a group.
        A collective: in a distributed run every rank must call it at the same point of the loop.
        `device` is where the one-number tensor lives (the backend's: CUDA for NCCL)."""
        if not is_initialized():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Install flag-only handlers for `signals` (default SIGTERM, SIGUSR1) and restore the previous ones
    on exit. Outside the main thread (where Python cannot install handlers) the request never fires."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopRequest", "stop_on_signals"]

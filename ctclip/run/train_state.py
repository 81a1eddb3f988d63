"""Where a training run stands and whether it goes on: `TrainState` (what the loop advances, every
checkpoint stores and a resume restores), `global_steps` (the optimizer steps in data order, each with
its micro-batches) and `stop_reason`, the one place that decides why a run ends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from ctclip.run.train_utils import BudgetClock, GlobalBatchSampler

if TYPE_CHECKING:
    from ctclip.run.train import TrainConfig


@dataclass
class TrainState:
    """The loop's position. The budget used is the BudgetClock's (checkpoints store it beside these)."""

    step: int = 0  # optimizer steps done, counted over every run of a resumed training
    epoch: int = 0  # epoch of the last step
    step_in_epoch: int = 0  # steps of `epoch` done: a resume starts the data order there
    best_metric: float = float("-inf")  # best validation mean AUROC so far (best.pt)
    start_step: int = 0  # `step` when this process started
    last_loss: float | None = None  # global-batch loss of this process's last step

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        return cls(step=ckpt["step"], epoch=ckpt["epoch"], step_in_epoch=ckpt["step_in_epoch"],
                   best_metric=ckpt["best_metric"], start_step=ckpt["step"])

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "best_metric": self.best_metric}


@dataclass
class GlobalStep:
    """One optimizer step's data: its number (1-based: TrainState.step once it is done), the epoch it
    belongs to and that epoch's steps done after it, and this rank's micro-batches."""

    step: int
    epoch: int
    step_in_epoch: int
    micro: list[Any]  # grad_accum loader items of this rank: (volumes or cached embeddings, texts)


def global_steps(loader: DataLoader, sampler: GlobalBatchSampler, state: TrainState,
                 grad_accum: int) -> Iterator[GlobalStep]:
    """The optimizer steps after `state`, epoch after epoch without end (`stop_reason` ends a run):
    the loader's micro-batches, in the order of its GlobalBatchSampler, grouped by `grad_accum`."""
    step, epoch, in_epoch = state.step, state.epoch, state.step_in_epoch
    while True:
        sampler.set_epoch(epoch, in_epoch)  # a resumed epoch starts after the steps already done
        loader.dataset.set_epoch(epoch)  # before the workers start: they copy the dataset
        micro: list[Any] = []
        for item in loader:
            micro.append(item)
            if len(micro) >= grad_accum:
                step, in_epoch = step + 1, in_epoch + 1
                yield GlobalStep(step, epoch, in_epoch, micro)
                micro = []
        epoch, in_epoch = epoch + 1, 0


def stop_reason(state: TrainState, cfg: TrainConfig, clock: BudgetClock, total_steps: int,
                signalled: bool = False) -> str | None:
    """Why the run ends at `state`, or None to take another step.

    budget: --max_minutes used up (it wins over the others: the run was cut by time); stop_at_step:
    --stop_at_step reached (the schedule stays the full run's, for a later --resume); steps: the last
    step, --max_steps or the end of --epochs (`total_steps`). The budget and --stop_at_step count only
    after a step of this process: a run resumed from a checkpoint they ended takes at least one step.
    In a distributed run the clock must hold rank 0's reading (`BudgetClock.share`), so every rank
    stops at the same step. signal: SIGTERM or SIGUSR1 arrived (`signalled`: ctcore.preemption's flag,
    agreed over the ranks); it comes last, so a run that is over anyway ends as it would have, and the
    script's exit status EXIT_PREEMPTED (75) means exactly "not done: resume from latest.pt"."""
    if state.step > state.start_step:
        if clock.exhausted():
            return "budget"
        if cfg.stop_at_step is not None and state.step >= cfg.stop_at_step:
            return "stop_at_step"
    if state.step >= total_steps:
        return "steps"
    return "signal" if signalled else None

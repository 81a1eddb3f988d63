"""The training loop's position and its one stop decision (ctclip/run/train_state.py)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Dataset

from ctclip.run.train_state import TrainState, global_steps, stop_reason
from ctclip.run.train_utils import GlobalBatchSampler


class _Items(Dataset):
    def __init__(self, n: int):
        self.n, self.epochs = n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _steps(state: TrainState, n: int = 20, batch: int = 4, accum: int = 2, take: int = 12) -> list:
    data = _Items(n)
    sampler = GlobalBatchSampler(n, batch, accum, world_size=1, rank=0, seed=3)
    loader = DataLoader(data, batch_sampler=sampler)
    out = []
    for gs in itertools.islice(global_steps(loader, sampler, state, accum), take):
        out.append((gs.step, gs.epoch, gs.step_in_epoch, [m.tolist() for m in gs.micro]))
    return out


def test_global_steps_number_the_steps_and_roll_over_epochs():
    steps = _steps(TrainState())
    assert [s[0] for s in steps] == list(range(1, 13))  # 1-based: TrainState.step once the step is done
    assert [s[1] for s in steps] == [0] * 5 + [1] * 5 + [2] * 2  # 20 items / batch 4 = 5 steps per epoch
    assert [s[2] for s in steps] == [1, 2, 3, 4, 5] * 2 + [1, 2]
    for _, _, _, micro in steps:
        assert len(micro) == 2 and all(len(m) == 2 for m in micro)  # grad_accum micro-batches of 4 / 2
    epoch0 = sorted(i for s in steps[:5] for m in s[3] for i in m)
    assert epoch0 == list(range(20))  # each epoch is one permutation: every item once
    assert [s[3] for s in steps[:5]] != [s[3] for s in steps[5:10]]  # and a new one each epoch


def test_global_steps_resumed_mid_epoch_continue_the_same_order():
    whole = _steps(TrainState())
    resumed = _steps(TrainState(step=7, epoch=1, step_in_epoch=2, start_step=7), take=5)
    assert resumed == whole[7:12]


class _Clock:
    def __init__(self, exhausted: bool):
        self._exhausted = exhausted

    def exhausted(self) -> bool:
        return self._exhausted


def test_stop_reason_is_the_one_decision_with_its_precedence():
    cfg = SimpleNamespace(stop_at_step=None)
    assert stop_reason(TrainState(step=3), cfg, _Clock(False), total_steps=10) is None
    assert stop_reason(TrainState(step=10), cfg, _Clock(False), total_steps=10) == "steps"
    assert stop_reason(TrainState(step=4), cfg, _Clock(True), total_steps=10) == "budget"
    cfg = SimpleNamespace(stop_at_step=4)
    assert stop_reason(TrainState(step=4), cfg, _Clock(False), total_steps=10) == "stop_at_step"
    assert stop_reason(TrainState(step=4), cfg, _Clock(True), total_steps=10) == "budget"  # time wins
    assert stop_reason(TrainState(step=10), cfg, _Clock(False), total_steps=10) == "stop_at_step"


def test_budget_and_stop_at_step_wait_for_a_step_of_this_process():
    # a run resumed from a checkpoint that the budget or --stop_at_step ended takes at least one step
    resumed = TrainState(step=4, start_step=4)
    assert stop_reason(resumed, SimpleNamespace(stop_at_step=4), _Clock(True), total_steps=10) is None
    assert stop_reason(resumed, SimpleNamespace(stop_at_step=None), _Clock(False), total_steps=4) == "steps"


def test_state_round_trips_through_checkpoint_fields():
    state = TrainState(step=9, epoch=2, step_in_epoch=1, best_metric=0.7, last_loss=torch.tensor(1.0).item())
    back = TrainState.from_checkpoint(state.checkpoint_fields())
    assert (back.step, back.epoch, back.step_in_epoch, back.best_metric) == (9, 2, 1, 0.7)
    assert back.start_step == 9  # a resumed process starts counting its own steps there

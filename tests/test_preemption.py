"""Training that survives the time limit (ctcore.preemption): SIGUSR1 / SIGTERM during a run of
ctclip_train.py, hemorrhage_train.py or hemorrhage_train_sequence.py -> the current step finishes, the
resume checkpoint is written, the script exits with EXIT_PREEMPTED (75), and resuming gives the log of
a run that never stopped. A second SIGTERM during the save changes nothing, and a SIGKILL during it
leaves the previous latest.pt.

Runs are subprocesses (a real signal to a real process, one OpenMP thread so that the numbers repeat).
To stop at a known step, a small driver (`_DRIVER`) wraps a function the loop calls once per step and
has the process send itself the signal from inside step N: the handler runs while that step is under
way, as it would when Slurm's signal arrives then.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctclip.checkpoint import load_checkpoint
from ctcore.preemption import EXIT_PREEMPTED, StopRequest, stop_on_signals
from tests.run_compare import assert_same_weights, epoch_log

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# argv: signal name, N, module, attribute, script, script args...: signal self inside the N-th call of
# module.attribute (0: no signal; under torchrun only in rank SIGNAL_RANK (env, default 0)); then run the
# script as __main__. SLOW_SAVE_AT=K (env): the K-th
# ctcore.atomic write of latest.pt writes its temporary file, touches SLOW_SAVE_MARK and sleeps.
_DRIVER = r"""
import importlib, os, runpy, signal, sys, time
sig, n, module, attr, script = sys.argv[1:6]
n = int(n) if os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0") else 0
mod = importlib.import_module(module)
orig = getattr(mod, attr)
calls = [0]
def wrapped(*a, **k):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), getattr(signal, sig))
    return orig(*a, **k)
setattr(mod, attr, wrapped)
if os.environ.get("SLOW_SAVE_AT"):
    import ctcore.atomic as atomic
    real, saves = atomic.os.replace, [0]
    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)
        def replace(self, src, dst):
            if str(dst).endswith("latest.pt"):
                saves[0] += 1
                if saves[0] == int(os.environ["SLOW_SAVE_AT"]):
                    open(os.environ["SLOW_SAVE_MARK"], "w").close()
                    time.sleep(600)
            return real(src, dst)
    atomic.os = _Os()
sys.argv = [script, *sys.argv[6:]]
runpy.run_path(script, run_name="__main__")
"""


def _run(script: str, args: list[str], sig: str = "SIGUSR1", at: int = 0, module: str = "", attr: str = "",
         **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-c", _DRIVER, sig, str(at), module or "os", attr or "getpid",
           str(ROOT / "scripts" / script), *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True)


# ----------------------------------------------------------------------------------------- the flag


def test_handlers_only_set_a_flag_and_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with stop_on_signals() as stop:
        assert not stop.requested and not stop.agreed()  # no process group: this process's flag
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still the first one's name, still alive
        assert stop.requested and stop.agreed() and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
    assert isinstance(StopRequest(), StopRequest) and EXIT_PREEMPTED == 75


@pytest.mark.ddp
def test_ranks_agree_on_one_ranks_signal():
    from tests.ddp_utils import run_distributed

    run_distributed(_agree, 2, init_group=True)


def _agree(rank: int, world_size: int) -> None:
    stop = StopRequest()
    assert stop.agreed() is False
    if rank == 1:
        stop(signal.SIGTERM, None)
    assert stop.agreed() is True  # rank 0 got nothing, and stops too


# ----------------------------------------------------------------------------------------- ctclip


def test_signal_is_the_last_reason_to_stop():
    """A run that ends anyway at this step ends as it would have (exit 0, no requeue); otherwise "signal"."""
    from types import SimpleNamespace

    from ctclip.run.train_state import TrainState, stop_reason

    class Clock:
        def __init__(self, exhausted: bool):
            self.exhausted = lambda: exhausted

    cfg = SimpleNamespace(stop_at_step=None)
    assert stop_reason(TrainState(step=3, start_step=2), cfg, Clock(False), 10, signalled=True) == "signal"
    assert stop_reason(TrainState(step=3, start_step=2), cfg, Clock(False), 10, signalled=False) is None
    assert stop_reason(TrainState(step=10, start_step=2), cfg, Clock(False), 10, signalled=True) == "steps"
    assert stop_reason(TrainState(step=3, start_step=2), cfg, Clock(True), 10, signalled=True) == "budget"
    cfg = SimpleNamespace(stop_at_step=3)
    assert stop_reason(TrainState(step=3, start_step=2), cfg, Clock(False), 10, signalled=True) == "stop_at_step"


def _ctclip_args(chest: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"), "--ct_filepath", str(chest / "train.h5"),
            "--txt_filepath", str(chest / "train_reports.csv"), "--output_dir", str(out), "--device", "cpu",
            "--log_interval", "1", "--max_steps", "10", *extra]


def _ctclip_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _ctclip_log(out) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def ctclip_full(synthetic_chest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ctclip_full")
    res = _run("ctclip_train.py", _ctclip_args(synthetic_chest, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.parametrize("sig", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_ctclip_signal_saves_exits_75_and_resumes_exactly(synthetic_chest, ctclip_full, tmp_path, sig):
    out = tmp_path / "run"
    res = _run("ctclip_train.py", _ctclip_args(synthetic_chest, out), sig, 4, "ctclip.run.train", "train_step")
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
    assert '"stopped_by": "signal"' in res.stdout
    ckpt = load_checkpoint(out / "latest.pt")  # whole and readable
    assert ckpt["step"] == 4  # the step under way when the signal came was finished, then the run stopped
    assert max(_losses(out)) == 4 and _ctclip_log(out)[-1]["stopped_by"] == "signal"
    res = _run("ctclip_train.py", _ctclip_args(synthetic_chest, out, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(ctclip_full), _losses(out)
    assert sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_ctclip_sigterm_and_sigkill_during_the_save_leave_the_previous_checkpoint(synthetic_chest, ctclip_full,
                                                                                  tmp_path):
    """The second save of latest.pt (step 4) hangs after writing its temporary file: a SIGTERM then only
    sets the flag again (the process stays), a SIGKILL kills it; latest.pt is still step 2's, whole."""
    out, mark = tmp_path / "run", tmp_path / "saving"
    env = {**ENV, "SLOW_SAVE_AT": "2", "SLOW_SAVE_MARK": str(mark)}
    proc = _run("ctclip_train.py", _ctclip_args(synthetic_chest, out, "--save_interval", "2"), env=env)
    try:
        deadline = time.time() + 600
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert mark.exists(), f"the run ended ({proc.returncode}) before its second save"
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # the handler set a flag; the save goes on
        partial = list(out.glob(".latest.pt.partial-*"))
        assert partial, "the temporary file should exist while the save is under way"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_checkpoint(out / "latest.pt")["step"] == 2
    res = _run("ctclip_train.py", _ctclip_args(synthetic_chest, out, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(ctclip_full), _losses(out)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


# ----------------------------------------------------------------------------------------- hemorrhage CNN


def _cnn_args(prepared: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "hemorrhage" / "train_tiny.yaml"), "--labels", str(labels),
            "--data_dir", str(prepared), "--output_dir", str(out), "--epochs", "2", "--samples_per_study", "8",
            "--device", "cpu", "--no_progress", *extra]


@pytest.fixture(scope="module")
def cnn_full(prepared_head, tmp_path_factory) -> Path:
    full = tmp_path_factory.mktemp("cnn_full")
    res = _run("hemorrhage_train.py", _cnn_args(*prepared_head, full))
    assert res.returncode == 0, res.stderr[-3000:]
    return full


@pytest.mark.parametrize("sig", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_cnn_signal_stops_after_the_batch_and_resumes_exactly(prepared_head, cnn_full, tmp_path, sig):
    prepared, labels = prepared_head
    full, part = cnn_full, tmp_path / "part"
    # 8 training studies x 8 draws in batches of 16: 4 batches per epoch; signal during batch 3 of epoch 0
    res = _run("hemorrhage_train.py", _cnn_args(prepared, labels, part), sig, 3, "torch.nn.functional",
               "binary_cross_entropy_with_logits")
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
    member = part / "tiny_densenet_64"
    st = torch.load(member / "train_state_0.pt", weights_only=True)
    assert st["epoch"] == -1 and st["in_epoch"]["epoch"] == 0 and st["in_epoch"]["batches"] == 3
    assert not (member / "train_log_0.jsonl").exists()  # no epoch was finished
    res = _run("hemorrhage_train.py", _cnn_args(prepared, labels, part, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    keys = ("epoch", "lr", "train_loss", "images", "val_weighted_log_loss", "best_epoch")
    assert epoch_log(member / "train_log_0.jsonl", keys) == epoch_log(full / "tiny_densenet_64" / "train_log_0.jsonl",
                                                                       keys)
    assert_same_weights(full / "tiny_densenet_64" / "model_epoch_best_0.pth", member / "model_epoch_best_0.pth")


# ----------------------------------------------------------------------------------------- sequence head


def _seq_args(feats: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "hemorrhage" / "sequence_tiny.yaml"), "--features_dir", str(feats),
            "--labels", str(labels), "--output_dir", str(out), "--epochs", "3", "--milestones", "2",
            "--device", "cpu", "--no_progress", *extra]


@pytest.fixture(scope="module")
def sequence_full(sequence_features, tmp_path_factory) -> Path:
    full = tmp_path_factory.mktemp("sequence_full")
    res = _run("hemorrhage_train_sequence.py", _seq_args(*sequence_features, full))
    assert res.returncode == 0, res.stderr[-3000:]
    return full


@pytest.mark.parametrize("sig, status, position", [
    ("SIGUSR1", EXIT_PREEMPTED, (1, 1)),
    pytest.param("SIGTERM", EXIT_PREEMPTED, (1, 1), marks=pytest.mark.slow),
    # killed outright: the state written after epoch 0 is what is left, and the resume starts epoch 1
    pytest.param("SIGKILL", -signal.SIGKILL, (1, 0), marks=pytest.mark.slow)])
def test_sequence_stop_or_kill_then_resume_equals_an_uninterrupted_run(sequence_features, sequence_full, tmp_path,
                                                                       sig, status, position):
    feats, labels = sequence_features
    full, part = sequence_full, tmp_path / "part"
    # 8 training series in batches of 4: 2 batches per epoch; call 3 is the first batch of epoch 1
    res = _run("hemorrhage_train_sequence.py", _seq_args(feats, labels, part), sig, 3,
               "hemorrhage.run.train_sequence", "sequence_loss")
    assert res.returncode == status, res.stderr[-3000:]
    st = torch.load(part / "sequence_state_0.pt", weights_only=True)
    assert (st["epoch"], st["batches_done"]) == position
    res = _run("hemorrhage_train_sequence.py", _seq_args(feats, labels, part, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    keys = ("epoch", "lr", "train_loss", "val_weighted_log_loss")
    assert epoch_log(part / "train_log_0.jsonl", keys) == epoch_log(full / "train_log_0.jsonl", keys)
    assert_same_weights(full / "sequence_fold0.pth", part / "sequence_fold0.pth")


@pytest.mark.ddp
@pytest.mark.slow  # ~26 s; the agreement itself is test_ranks_agree_on_one_ranks_signal (default suite)
def test_ctclip_two_ranks_stop_together_when_one_is_signalled(synthetic_chest, ctclip_full, tmp_path):
    """torchrun, 2 gloo ranks: only rank 1 gets SIGUSR1 (during step 3); both stop after step 3 with
    status 75 (torchrun itself reports 1), rank 0 saves latest.pt, and the resumed run matches."""
    out, driver = tmp_path / "ddp", tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           "SIGUSR1", "3", "ctclip.run.train", "train_step", str(ROOT / "scripts" / "ctclip_train.py"), "--use_ddp",
           *_ctclip_args(synthetic_chest, out)]
    res = subprocess.run(cmd, env={**ENV, "SIGNAL_RANK": "1"}, capture_output=True, text=True)
    assert res.returncode != 0 and res.stderr.count("exitcode  : 75") + res.stderr.count("exitcode: 75") >= 1, \
        res.stderr[-3000:]
    assert load_checkpoint(out / "latest.pt")["step"] == 3
    assert max(_losses(out)) == 3 and _ctclip_log(out)[-1]["stopped_by"] == "signal"
    res = _run("ctclip_train.py", _ctclip_args(synthetic_chest, out, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(ctclip_full), _losses(out)
    assert sorted(b) == list(range(1, 11))
    for step in a:  # the same global batches for any number of processes (tests/test_ctclip_train.py)
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_sequence_resume_from_a_damaged_state_names_the_file(sequence_features, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sequence_state_0.pt").write_bytes(b"not a checkpoint")
    res = _run("hemorrhage_train_sequence.py", _seq_args(*sequence_features, out, "--resume"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "sequence_state_0.pt: not a resume state" in res.stderr

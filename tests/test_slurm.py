"""The project's SLURM job files, unchanged, on a real one-node SLURM (tests/slurm_cluster.py, the `slurm`
fixture; skipped without slurm-wlm and munge).

Only sbatch command-line flags adapt a job to this node (its CPUs, no GPU, the memory, the log file), and
the job's own flags after the script name choose what the script does ("$@" reaches the script; the
flags given there win over what the job adds, such as --device cuda). submit_ctclip_pipeline.sh calls
sbatch itself, so there SLURM's SBATCH_* variables and the script's own variables do it, on a node that
declares the CPUs and GPUs the jobs ask for (see pipeline_cluster). Outputs are compared with a direct run
of the same script.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ctclip.data.store import VolumeStore
from hemorrhage.models.checkpoint import save_random_weights
from scripts.hemorrhage_infer import main as infer
from scripts.hemorrhage_prepare import main as prepare
from tests.run_compare import assert_same_weights, epoch_log
from tests.slurm_cluster import free_port, start_or_skip

pytestmark = [pytest.mark.slurm,
              pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")]

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "scripts" / "slurm"
# what adapts the jobs' #SBATCH lines (16 CPUs, 32G, a GPU) to a small CPU node
SMALL = ["--cpus-per-task=1", "--mem=1G", "--time=10"]
TINY = ("tiny_densenet", 64)


def submit(slurm, job: str, args: list[str], log_dir: Path, sbatch_flags: list[str] = ()) -> tuple[str, Path]:
    """sbatch a job file of scripts/slurm from the checkout; returns the job id and its log file."""
    log = log_dir / f"{Path(job).stem}.%j.out"
    job_id = slurm.sbatch([*SMALL, *sbatch_flags, f"--output={log}", str(JOBS / job), *args], cwd=ROOT)
    return job_id, Path(str(log).replace("%j", job_id))


def assert_same_tree(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    """Both folders hold the same files, with the same bytes (names in ``skip`` only need to exist)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    differ = [str(f) for f in files_a if f.name not in skip and not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not differ, f"files differ: {differ}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_weights")
    save_random_weights(root, [TINY], folds=(0,), seed=4)
    return root


@pytest.fixture(scope="module")
def prepared(slurm, synthetic_head, tmp_path_factory) -> dict:
    """hemorrhage_prepare.sbatch and a direct run of scripts/hemorrhage_prepare.py on the same studies."""
    d = tmp_path_factory.mktemp("slurm_prepare")
    flags = ["--input_dir", str(synthetic_head / "dicom"), "--format", "npz"]
    job, log = submit(slurm, "hemorrhage_prepare.sbatch", [*flags, "--output_dir", str(d / "job")], d)
    assert prepare([*flags, "--output_dir", str(d / "direct"), "--num_workers", "0"]) == 3  # 2 broken files
    state, code = slurm.wait(job, timeout=120)
    return {"dir": d, "state": state, "code": code, "log": log}


def test_prepare_job_equals_a_direct_run(prepared):
    d = prepared["dir"]
    # the synthetic set has two broken files: the job ends with the script's exit status 3, as documented
    assert (prepared["state"], prepared["code"]) == ("FAILED", "3:0"), prepared["log"].read_text()
    assert "usage:" not in prepared["log"].read_text()
    assert_same_tree(d / "direct", d / "job", skip=("prepare_config.yaml",))
    direct = pd.read_csv(d / "direct" / "errors.csv")
    assert len(direct) == 2 and direct.equals(pd.read_csv(d / "job" / "errors.csv"))


def test_infer_job_on_cpu_equals_a_direct_run(slurm, prepared, weights, tmp_path):
    """hemorrhage_infer.sbatch asks for a GPU and adds --device cuda --amp bf16: sbatch's --gpus=0 drops the
    GPU, and --device cpu --amp none after the script name win over the job's own flags."""
    data = prepared["dir"] / "job"
    flags = ["--data_dir", str(data), "--weights_dir", str(weights), "--batch_size", "8", "--device", "cpu",
             "--amp", "none", "--no_progress"]
    job, log = submit(slurm, "hemorrhage_infer.sbatch",
                      [*flags, "--output", str(tmp_path / "job" / "pred.csv")], tmp_path,
                      sbatch_flags=["--gpus=0"])
    # exit status 3: the two files that failed in preparation are reported again
    assert infer([*flags, "--output", str(tmp_path / "direct" / "pred.csv"), "--num_workers", "0"]) == 3
    state, code = slurm.wait(job, timeout=150)
    assert (state, code) == ("FAILED", "3:0"), log.read_text()
    assert "141 slices predicted; 2 files failed" in log.read_text()
    for name in ("pred.csv", "pred_per_slice.csv", "pred_per_study.csv", "pred_errors.csv"):
        assert filecmp.cmp(tmp_path / "direct" / name, tmp_path / "job" / name, shallow=False), name
    runs = [json.loads((tmp_path / k / "pred_run.json").read_text()) for k in ("direct", "job")]
    assert runs[0]["device"] == runs[1]["device"] and runs[1]["device"]["type"] == "cpu"


def test_failed_job_stops_its_dependants(slurm, tmp_path):
    """A job that fails on bad input ends FAILED with the reason in its log; a job that depends on it with
    afterok is cancelled without running (--kill-on-invalid-dep=yes)."""
    missing = tmp_path / "no_such_dicoms"
    job, log = submit(slurm, "hemorrhage_prepare.sbatch",
                      ["--input_dir", str(missing), "--output_dir", str(tmp_path / "prep")], tmp_path)
    after, after_log = submit(slurm, "hemorrhage_infer.sbatch",
                              ["--data_dir", str(tmp_path / "prep"), "--weights_dir", str(tmp_path / "w"),
                               "--output", str(tmp_path / "pred.csv"), "--device", "cpu"], tmp_path,
                              sbatch_flags=["--gpus=0", f"--dependency=afterok:{job}",
                                            "--kill-on-invalid-dep=yes"])
    assert slurm.wait(job, timeout=60) == ("FAILED", "2:0")
    text = log.read_text()
    assert str(missing) in text, text
    state, _ = slurm.wait(after, timeout=60)
    assert state == "CANCELLED"
    info = slurm.job_info(after)
    assert info and info[0].get("Reason") == "DependencyNeverSatisfied"
    assert not after_log.exists() and not (tmp_path / "pred.csv").exists()
    ends = {r["JobId"]: r["JobState"] for r in slurm.jobcomp_records()}
    assert ends[job] == "FAILED" and ends[after] == "CANCELLED"


# ------------------------------------------------------------------------------ the CT-RATE pipeline

@pytest.fixture(scope="module")
def pipeline_cluster(tmp_path_factory):
    """A node as the CT-RATE jobs expect one: their #SBATCH lines ask for 8 and 32 CPUs and the training
    for GPUs, and submit_ctclip_pipeline.sh submits them itself (only environment variables reach it).
    So this node declares 32 CPUs on this machine and 2 stand-in GPUs; the training runs on the CPU
    because the job passes --device cpu on to scripts/ctclip_train.py."""
    cluster = start_or_skip(tmp_path_factory.mktemp("slurm_pipeline"), cpus=32, gpus=2)
    yield cluster
    cluster.stop()


def train_records(path: Path) -> list[dict]:
    """The training log without its clock fields."""
    keep = ("kind", "step", "epoch", "loss", "lr", "temperature", "stopped_by")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, path.read_text().splitlines())]


def test_ctclip_pipeline(pipeline_cluster, synthetic_chest, tmp_path):
    """submit_ctclip_pipeline.sh: a 2-shard preprocessing array, the merge and a 2-process torchrun training
    (gloo on the CPU), each after the one before. The merged store equals the unsharded one
    (synthetic_chest's train.h5) and the training log equals a 2-process torchrun run of the script."""
    chest = synthetic_chest
    store = tmp_path / "stores" / "train.h5"
    train_flags = ["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"),
                   "--txt_filepath", str(chest / "train_reports.csv"), "--device", "cpu",
                   "--log_interval", "1", "--max_steps", "3"]
    env = pipeline_cluster.env({
        "NUM_SHARDS": "2", "PREPROCESS_FLAGS": "--target_shape 16 48 48", "NODES": "1", "GPUS_PER_NODE": "2",
        "NUM_WORKERS": "0", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        # SLURM's own variables for what the script's sbatch calls do not set
        "SBATCH_MEM_PER_NODE": "1G", "SBATCH_TIMELIMIT": "15", "SBATCH_OUTPUT": str(tmp_path / "%x-%j.out"),
    })
    r = subprocess.run(["bash", str(JOBS / "submit_ctclip_pipeline.sh"), str(chest / "volumes" / "train"),
                        str(chest / "train_metadata.csv"), str(store), *train_flags,
                        "--output_dir", str(tmp_path / "run")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ids = re.search(r"preprocess array (\d+) \(2 tasks\) -> merge (\d+) -> train (\d+)", r.stdout)
    assert ids, r.stdout
    pipeline_cluster.submitted.extend(ids.groups())
    preprocess, merge, train = ids.groups()

    # meanwhile, the reference: the same training with 2 processes under torchrun, on the unsharded store
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(ROOT / "scripts" / "ctclip_train.py"),
                          "--use_ddp", "--resume", "latest",
                          "--ct_filepath", str(chest / "train.h5"), *train_flags,
                          "--output_dir", str(tmp_path / "ref")],
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    for job, timeout in ((preprocess, 120), (merge, 60), (train, 180)):
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.out")))
        assert pipeline_cluster.wait(job, timeout) == ("COMPLETED", "0:0"), logs
    assert len(pipeline_cluster.job_info(preprocess)) == 2  # two array tasks

    assert sorted(p.name for p in store.parent.glob("*.h5")) == ["train.h5", "train.shard-0-of-2.h5",
                                                                 "train.shard-1-of-2.h5"]
    with VolumeStore(chest / "train.h5") as a, VolumeStore(store) as b:
        assert b.names() == a.names()
        for name in a.names():
            np.testing.assert_array_equal(b.read(name), a.read(name))
            assert b.attrs(name) == a.attrs(name)
        for key in ("config", "target_shape", "store_version", "ctclip_version"):
            assert b.file_attrs()[key] == a.file_attrs()[key], key

    job_log = train_records(tmp_path / "run" / "train_log.jsonl")
    ref_log = train_records(tmp_path / "ref" / "train_log.jsonl")
    assert [r["step"] for r in job_log if r["kind"] == "train"] == [1, 2, 3]
    assert job_log == ref_log
    # two processes ran in the job: each rank warns once about the long synthetic reports, as in the reference
    train_out = (tmp_path / f"ctclip-train-{train}.out").read_text()
    n_ref = (ref.stdout + ref.stderr).count("sampled reports")
    assert train_out.count("sampled reports") == n_ref == 2, train_out


@pytest.fixture(scope="module")
def requeue_cluster(tmp_path_factory):
    """A node with two stand-in GPUs on which a requeued job starts again within seconds: Slurm holds a
    requeued job back for AuthInfo's cred_expire (120 s by default) and then starts it at the next pass of
    its scheduler (sched_interval, 60 s by default); both are shortened here."""
    cluster = start_or_skip(tmp_path_factory.mktemp("slurm_requeue"), gpus=2, cred_expire=10,
                            extra_config=["SchedulerParameters=sched_interval=2,bf_interval=2"])
    yield cluster
    cluster.stop()


@pytest.mark.slow  # ~60-75 s on 2 cores: two starts of the job, the requeue delay and the reference run
def test_ctclip_train_job_is_signalled_requeued_and_resumes_exactly(requeue_cluster, synthetic_chest, tmp_path):
    """ctclip_train.sbatch (#SBATCH --signal=B:USR1@90 --requeue) through Slurm's own path before a time
    limit: USR1 to the batch shell alone (`scancel --signal=USR1 --batch`, what slurmctld sends for B:USR1;
    a real --time is whole minutes and its signal can come up to a minute late, too slow here) while the
    training runs. The job forwards it to the step, the training saves latest.pt and stops, the job
    requeues itself, its second run resumes from latest.pt and ends COMPLETED, and the loss of every step
    equals an uninterrupted torchrun run with the same (one) process. --open-mode=append keeps the first
    run's output: by default Slurm truncates the output file when the requeued run starts."""
    cluster, chest = requeue_cluster, synthetic_chest
    steps = 40
    train_flags = ["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"),
                   "--ct_filepath", str(chest / "train.h5"), "--txt_filepath", str(chest / "train_reports.csv"),
                   "--device", "cpu", "--log_interval", "1", "--max_steps", str(steps)]
    out, log = tmp_path / "run", tmp_path / "ctclip-train.%j.out"
    env = {"GPUS_PER_NODE": "1", "NUM_WORKERS": "0", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable}
    job = cluster.sbatch(["--nodes=1", "--gpus-per-node=1", *SMALL, "--open-mode=append", f"--output={log}",
                          str(JOBS / "ctclip_train.sbatch"), *train_flags, "--output_dir", str(out)],
                         env=env, cwd=ROOT)
    log = Path(str(log).replace("%j", job))
    train_log = out / "train_log.jsonl"

    def job_text() -> str:
        return f"--- {log.name}\n{log.read_text()[-6000:] if log.exists() else '(no log)'}"

    # the signal once some steps are done, far from the run's end
    deadline = time.monotonic() + 120
    while not (train_log.exists() and train_log.read_text().count('"kind": "train"') >= 5):
        assert time.monotonic() < deadline, job_text()
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])

    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          str(ROOT / "scripts" / "ctclip_train.py"), "--use_ddp", "--resume", "latest", *train_flags,
                          "--output_dir", str(tmp_path / "ref")],
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    assert cluster.wait(job, timeout=180) == ("COMPLETED", "0:0"), job_text()
    info = cluster.job_info(job)
    assert info and info[0].get("Restarts") == "1", info
    records = train_records(train_log)
    stops = [r for r in records if r.get("stopped_by") == "signal"]
    assert len(stops) == 1, records
    stopped_at = stops[0]["step"]
    assert 5 <= stopped_at < steps
    text = log.read_text()
    # torchrun reports its worker's 75 as 1: the job requeues on "a stop was asked for and the run did not finish"
    assert re.search(rf"ctclip_train stopped for the time limit \(status (1|75)\): requeueing job {job}\n", text), \
        job_text()
    assert f"resumed from {out / 'latest.pt'} at step {stopped_at} " in text, job_text()
    assert text.count('"stopped_by": "signal"') == 1 and text.count('"stopped_by": "steps"') == 1, job_text()

    job_losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    ref_losses = [(r["step"], r["loss"]) for r in train_records(tmp_path / "ref" / "train_log.jsonl")
                  if r["kind"] == "train"]
    assert [s for s, _ in job_losses] == list(range(1, steps + 1))
    assert job_losses == ref_losses


def _signal_once(cluster, job: str, ready, what: str, timeout: float = 180) -> None:
    """USR1 to the job's batch shell (what Slurm sends for --signal=B:USR1@90) once ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow  # ~60-90 s on 2 cores: both jobs run twice, the requeue delay, the reference runs
def test_hemorrhage_training_jobs_are_signalled_requeued_and_resume_exactly(requeue_cluster, prepared_head,
                                                                              sequence_features, tmp_path):
    """hemorrhage_train.sbatch (torchrun, one process) and hemorrhage_train_sequence.sbatch side by side,
    each signalled as before its time limit once an epoch is done: each finishes its batch, saves its
    resume state, requeues itself, resumes mid-epoch and ends COMPLETED with Restarts=1, with the epoch log
    and the best weights of an uninterrupted direct run."""
    cluster = requeue_cluster
    (prepared, labels), (features, seq_labels) = prepared_head, sequence_features
    cnn_flags = ["--config", str(ROOT / "configs" / "hemorrhage" / "train_tiny.yaml"), "--labels", str(labels),
                 "--data_dir", str(prepared), "--epochs", "8", "--samples_per_study", "8", "--device", "cpu",
                 "--no_progress"]
    seq_flags = ["--config", str(ROOT / "configs" / "hemorrhage" / "sequence_tiny.yaml"), "--features_dir",
                 str(features), "--labels", str(seq_labels), "--epochs", "40", "--milestones", "30", "--device",
                 "cpu", "--no_progress"]
    env = {"GPUS_PER_NODE": "1", "NUM_WORKERS": "0", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable}
    jobs = {}
    for name, flags, extra in (("hemorrhage_train", cnn_flags, ["--gpus-per-node=1"]),
                               ("hemorrhage_train_sequence", seq_flags, [])):
        log = tmp_path / f"{name}.%j.out"
        job = cluster.sbatch([*SMALL, *extra, "--open-mode=append", f"--output={log}", str(JOBS / f"{name}.sbatch"),
                              *flags, "--output_dir", str(tmp_path / name)], env=env, cwd=ROOT)
        jobs[name] = job, Path(str(log).replace("%j", job))

    def job_text(name: str):
        log = jobs[name][1]
        return lambda: f"--- {log.name}\n{log.read_text()[-6000:] if log.exists() else '(no log)'}"

    cnn_log = tmp_path / "hemorrhage_train" / "tiny_densenet_64" / "train_log_0.jsonl"
    seq_log = tmp_path / "hemorrhage_train_sequence" / "train_log_0.jsonl"
    _signal_once(cluster, jobs["hemorrhage_train_sequence"][0], lambda: _lines(seq_log) >= 2,
                 job_text("hemorrhage_train_sequence"))
    _signal_once(cluster, jobs["hemorrhage_train"][0], lambda: _lines(cnn_log) >= 1, job_text("hemorrhage_train"))

    # the uninterrupted runs, while the jobs wait to be started again
    direct = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                 "--master_port", str(free_port()), str(ROOT / "scripts" / "hemorrhage_train.py"), "--use_ddp",
                 "--num_workers", "0", *cnn_flags, "--output_dir", str(tmp_path / "ref_cnn")],
                [sys.executable, str(ROOT / "scripts" / "hemorrhage_train_sequence.py"), *seq_flags, "--output_dir",
                 str(tmp_path / "ref_seq")]):
        ref = subprocess.run(cmd, env=direct, capture_output=True, text=True, timeout=300)
        assert ref.returncode == 0, ref.stderr[-3000:]

    for name, (job, log) in jobs.items():
        assert cluster.wait(job, timeout=240) == ("COMPLETED", "0:0"), job_text(name)()
        info = cluster.job_info(job)
        assert info and info[0].get("Restarts") == "1", info
        text = log.read_text()
        assert re.search(rf"{name} stopped for the time limit \(status (1|75)\): requeueing job {job}\n", text), \
            job_text(name)()
        assert "resumed from " in text, job_text(name)()

    cnn_state = torch.load(cnn_log.parent / "train_state_0.pt", weights_only=True)
    assert cnn_state["epoch"] == 7 and not cnn_state.get("in_epoch")
    keys = ("epoch", "lr", "train_loss", "images", "val_weighted_log_loss", "best_epoch")
    assert epoch_log(cnn_log, keys) == epoch_log(tmp_path / "ref_cnn" / "tiny_densenet_64" / "train_log_0.jsonl", keys)
    assert len(epoch_log(cnn_log, keys)) == 8
    keys = ("epoch", "lr", "train_loss", "val_weighted_log_loss")
    assert epoch_log(seq_log, keys) == epoch_log(tmp_path / "ref_seq" / "train_log_0.jsonl", keys)
    assert len(epoch_log(seq_log, keys)) == 40
    assert_same_weights(cnn_log.parent / "model_epoch_best_0.pth",
                        tmp_path / "ref_cnn" / "tiny_densenet_64" / "model_epoch_best_0.pth")
    assert_same_weights(seq_log.parent / "sequence_fold0.pth", tmp_path / "ref_seq" / "sequence_fold0.pth")


def _sequence_flags(features: Path, labels: Path, epochs: int) -> list[str]:
    return ["--config", str(ROOT / "configs" / "hemorrhage" / "sequence_tiny.yaml"), "--features_dir", str(features),
            "--labels", str(labels), "--epochs", str(epochs), "--milestones", str(epochs * 2 // 3), "--device",
            "cpu", "--no_progress"]


@pytest.mark.slow  # ~3-4 min on 2 cores: a real time limit is whole minutes, on slurmctld's 30-s clock
@pytest.mark.timeout(900)
def test_a_real_time_limit_signals_the_job_which_requeues_until_done(requeue_cluster, sequence_features, tmp_path):
    """No scancel here: hemorrhage_train_sequence.sbatch with a 3-minute --time and its own
    --signal=B:USR1@90 gets USR1 from slurmctld's clock, saves, requeues itself as often as it takes, and
    ends COMPLETED (not TIMEOUT) with the epoch log and best weights of an uninterrupted run. slurmctld
    checks limits every 30 s and sends the warning at the first check less than 90 + 30 s before the
    limit, so with --time=3 it comes 60-90 s after each start: the run is sized (from a timed short run)
    to need about 120 s of training, more than one run can do."""
    cluster = requeue_cluster
    features, labels = sequence_features
    direct = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "scripts" / "hemorrhage_train_sequence.py")
    t0 = time.monotonic()
    probe = subprocess.run([sys.executable, script, *_sequence_flags(features, labels, 1), "--output_dir",
                            str(tmp_path / "probe")], env=direct, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    setup = time.monotonic() - t0
    t0 = time.monotonic()
    probe = subprocess.run([sys.executable, script, *_sequence_flags(features, labels, 21), "--output_dir",
                            str(tmp_path / "probe21")], env=direct, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    per_epoch = max(time.monotonic() - t0 - setup, 0.1) / 20
    epochs = int(120 / per_epoch) + 1
    flags = _sequence_flags(features, labels, epochs)
    out, log = tmp_path / "run", tmp_path / "sequence.%j.out"
    job = cluster.sbatch(["--cpus-per-task=1", "--mem=1G", "--time=3", "--open-mode=append", f"--output={log}",
                          str(JOBS / "hemorrhage_train_sequence.sbatch"), *flags, "--output_dir", str(out)],
                         env={"NUM_WORKERS": "0", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}, cwd=ROOT)
    log = Path(str(log).replace("%j", job))
    ref = subprocess.run([sys.executable, script, *flags, "--output_dir", str(tmp_path / "ref")], env=direct,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    def job_text() -> str:
        return f"{epochs} epochs, {per_epoch:.2f} s each\n--- {log.name}\n" + (
            log.read_text()[-6000:] if log.exists() else "(no log)")

    assert cluster.wait(job, timeout=600) == ("COMPLETED", "0:0"), job_text()
    restarts = int(cluster.job_info(job)[0].get("Restarts", "0"))
    text = log.read_text()
    assert restarts >= 1 and text.count("stopped for the time limit") == restarts, job_text()
    assert text.count("resumed from ") == restarts, job_text()
    keys = ("epoch", "lr", "train_loss", "val_weighted_log_loss")
    assert epoch_log(out / "train_log_0.jsonl", keys) == epoch_log(tmp_path / "ref" / "train_log_0.jsonl", keys)
    assert_same_weights(out / "sequence_fold0.pth", tmp_path / "ref" / "sequence_fold0.pth")

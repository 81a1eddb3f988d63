"""scripts/hemorrhage_train.py on synthetic head CT studies: the recipe's pieces, learning, resuming,
original-format checkpoints that inference loads, bad labels, and a 2-process gloo run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hemorrhage.classes import CLASSES
from hemorrhage.metrics import baseline_log_loss, prior_baseline, weighted_log_loss
from hemorrhage.models.checkpoint import read_original_checkpoint
from hemorrhage.train_cnn import TrainConfig, lr_at
from hemorrhage.train_data import (
    EpochDraws,
    LabelError,
    TrainSeries,
    load_or_make_folds,
    make_folds,
    read_labels,
    triangular_weights,
)
from scripts.hemorrhage_infer import main as infer
from scripts.hemorrhage_make_synthetic import main as make_synthetic
from scripts.hemorrhage_train import main as train
from tests.ddp_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "hemorrhage" / "train_tiny.yaml")
SYNTH = str(ROOT / "configs" / "hemorrhage" / "synthetic_small.yaml")


def synth(out: Path, n: int, seed: int) -> Path:
    assert make_synthetic(["--config", SYNTH, "--out_dir", str(out), "--n_studies", str(n), "--size", "64",
                           "--slices", "16", "--seed", str(seed), "--broken", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def head_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sets")
    return synth(root / "train", 32, 3), synth(root / "test", 12, 4)


# ----------------------------------------------------------------------------------------- pieces


def test_triangular_weights_match_the_original():
    def original(length):  # the original's generate_random_list(n - 1), as counts per index
        counts = np.zeros(length + 1)
        for i in range(length):
            counts[i] = max(1, int(i / 4) if i <= length / 2 else int((length - i) / 4))
        return counts

    for n in (1, 2, 5, 16, 33):
        w = triangular_weights(n)
        np.testing.assert_array_equal(w[:-1], original(n - 1)[:-1])  # same weights, plus the last slice (1)
        assert w[-1] == 1 and np.array_equal(w, w[::-1])


def test_folds_are_deterministic_by_study_and_reused(tmp_path):
    studies = [f"s{i}" for i in range(23)] * 2
    a, b = make_folds(studies, 5, 0), make_folds(list(reversed(studies)), 5, 0)
    assert a == b
    counts = np.bincount(list(a.values()))
    assert len(counts) == 5 and counts.max() - counts.min() <= 1
    assert make_folds(studies, 5, 1) != a
    path = tmp_path / "folds.csv"
    assert load_or_make_folds(path, studies, 5, 0) == a
    assert load_or_make_folds(path, studies, 5, 99) == a  # the file wins: every fold's run agrees
    with pytest.raises(ValueError, match="no fold for 1 studies"):
        load_or_make_folds(path, [*studies, "new"], 5, 0)


def test_epoch_draws_follow_the_recipe():
    from hemorrhage.inference_data import SeriesJob

    def job(study, n):
        return SeriesJob(study, f"{study}-x", [f"{study}.{i}" for i in range(n)], [float(i) for i in range(n)],
                         [""] * n, [""] * n, "npz")

    labels = np.zeros((20, 6), np.float32)
    labels[0] = np.nan  # unlabelled: never drawn, still a neighbour
    series = [TrainSeries(job("a", 20), labels), TrainSeries(job("b", 4), np.zeros((4, 6), np.float32))]
    d = EpochDraws(series, samples_per_study=4, seed=0)
    assert len(d) == 8
    d.set_epoch(0)
    first = d.draws()
    d.set_epoch(1)
    assert d.draws() != first
    big = EpochDraws(series, samples_per_study=5000, seed=0)
    slices = np.array([s for k, s, _, _ in big.draws() if k == 0])
    assert 0 not in slices and abs(np.mean(slices == 10) / np.mean(slices == 1) - 2.0) < 0.5  # weight 2 vs 1
    d.set_epoch(0)
    ranks = [list(EpochDraws(series, 4, 0, rank=r, world_size=3)) for r in range(3)]
    assert sorted(x for r in ranks for x in r) == sorted(d.draws())


def test_schedule_is_constant_then_cosine_restarts():
    cfg = TrainConfig(labels=Path("x"), data_dir=Path("x"), output_dir=Path("x"))
    assert [lr_at(e, cfg) for e in range(10)] == [5e-4] * 10
    assert lr_at(10, cfg) == pytest.approx(5e-4) and lr_at(15, cfg) == pytest.approx(5e-4)
    assert lr_at(12, cfg) < lr_at(11, cfg) < 5e-4 and lr_at(14, cfg) > 1e-5


def test_bad_labels_name_the_file_and_row(tmp_path):
    good = ["ID,Label"] + [f"ID_a_{c},0" for c in CLASSES]
    cases = {
        "cols.csv": ["Id,Value", "ID_a_any,0"],
        "value.csv": good[:3] + ["ID_a_intraventricular,maybe"] + good[4:],
        "two.csv": good[:3] + ["ID_a_intraventricular,2"] + good[4:],
        "class.csv": good + ["ID_a_contusion,1"],
        "dup.csv": good + ["ID_a_any,1"],
        "incomplete.csv": good[:-1],
        "empty.csv": ["ID,Label"],
    }
    for name, lines in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        with pytest.raises(LabelError, match=name.replace(".", r"\.")):
            read_labels(tmp_path / name)
    (tmp_path / "good.csv").write_text("\n".join(good) + "\n")
    assert read_labels(tmp_path / "good.csv").loc["ID_a"].tolist() == [0] * 6


def test_script_exit_codes_on_bad_input(head_sets, tmp_path):
    train_set, _ = head_sets
    (tmp_path / "bad.csv").write_text("ID,Label\nfoo,1\n")
    common = ["--config", TINY, "--output_dir", str(tmp_path / "o"), "--no_progress"]
    assert train([*common, "--labels", str(tmp_path / "bad.csv"), "--data_dir", str(train_set / "dicom")]) == 2
    assert train([*common, "--labels", str(train_set / "labels.csv"), "--data_dir", str(tmp_path / "none")]) == 2
    assert train([*common, "--labels", str(train_set / "labels.csv"), "--data_dir", str(train_set / "dicom"),
                  "--fold", "7"]) == 2
    other = tmp_path / "other.csv"  # labels of other slices: nothing to train on
    other.write_text("ID,Label\n" + "\n".join(f"ID_zz_{c},0" for c in CLASSES) + "\n")
    assert train([*common, "--labels", str(other), "--data_dir", str(train_set / "dicom")]) == 2


# ----------------------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(head_sets, tmp_path_factory):
    train_set, _ = head_sets
    out = tmp_path_factory.mktemp("run")
    args = ["--config", TINY, "--labels", str(train_set / "labels.csv"), "--data_dir", str(train_set / "dicom"),
            "--output_dir", str(out), "--no_progress", "--val_every", "100"]
    assert train(args) == 0
    return out, args


def test_trained_checkpoint_runs_in_inference_and_training_fits(head_sets, trained):
    """The best checkpoint loads unchanged in hemorrhage_infer.py; the training loss falls clearly.

    Not yet asserted (issue 7 is open): beating the prior baseline on held-out studies. With this tiny
    budget (6 epochs, ~2,500 images of 64 px) the held-out weighted log loss is about the prior's."""
    train_set, test_set = head_sets
    out, _ = trained
    pred = out / "infer" / "predictions.csv"
    assert infer(["--data_dir", str(test_set / "dicom"), "--weights_dir", str(out), "--output", str(pred),
                  "--no_progress", "--num_workers", "0", "--device", "cpu"]) == 0
    p = pd.read_csv(pred).set_index("ID")["Label"]
    truth = read_labels(test_set / "labels.csv")
    probs = np.stack([p[[f"{s}_{c}" for s in truth.index]].to_numpy() for c in CLASSES], 1)
    ours = weighted_log_loss(truth.to_numpy(), probs)
    prior = baseline_log_loss(prior_baseline(read_labels(train_set / "labels.csv").to_numpy()), truth.to_numpy())
    print(f"held-out weighted log loss: tiny CNN {ours:.4f}, prior baseline {prior:.4f}")
    assert np.isfinite(ours) and ours < 1.0
    log = [json.loads(x) for x in (out / "tiny_densenet_64" / "train_log_0.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.85 * log[0]["train_loss"]


def test_checkpoints_logs_and_resume(trained):
    out, args = trained
    member = out / "tiny_densenet_64"
    best = read_original_checkpoint(member / "model_epoch_best_0.pth")
    assert all(not k.startswith("module.") for k in best.state_dict)  # the reader strips the prefix
    raw = torch.load(member / "model_epoch_best_0.pth", weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "valLoss"} and all(k.startswith("module.") for k in raw["state_dict"])
    lines = [json.loads(x) for x in (member / "train_log_0.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(6))
    assert "val_weighted_log_loss" in lines[-1] and "val_weighted_log_loss" not in lines[0]
    assert (out / "folds.csv").is_file() and (out / "prepared" / "manifest.csv").is_file()
    # two more epochs from the saved state: the log continues, the schedule picks up at epoch 6
    assert train([*args, "--resume", "--epochs", "8"]) == 0
    lines = [json.loads(x) for x in (member / "train_log_0.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(8))
    assert lines[6]["lr"] == pytest.approx(lr_at(6, TrainConfig(Path(), Path(), Path(), lr=0.002, constant_epochs=4,
                                                                  restart_period=2)))


# ----------------------------------------------------------------------------------------- DDP


def _two_rank_training(rank: int, world_size: int, data: str, labels: str, out: str) -> None:
    from scripts.hemorrhage_train import main as train_main

    assert train_main(["--config", TINY, "--labels", labels, "--data_dir", data, "--output_dir", out, "--use_ddp",
                       "--device", "cpu", "--epochs", "2", "--no_progress", "--max_draws", "32"]) == 0


@pytest.mark.ddp
def test_two_process_gloo_training_completes(head_sets, tmp_path):
    train_set, _ = head_sets
    run_distributed(_two_rank_training, 2, str(train_set / "dicom"), str(train_set / "labels.csv"),
                    str(tmp_path / "ddp"), init_group=False)
    lines = (tmp_path / "ddp" / "tiny_densenet_64" / "train_log_0.jsonl").read_text().splitlines()
    assert [json.loads(x)["images"] for x in lines] == [32, 32]  # 16 draws per rank, counted over both
    assert (tmp_path / "ddp" / "tiny_densenet_64" / "model_epoch_best_0.pth").is_file()

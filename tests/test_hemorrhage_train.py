"""scripts/hemorrhage_train.py on synthetic head CT studies: the recipe's pieces, learning (held-out loss
clearly below the prevalence prior), training samples equal to inference inputs, resuming, original-format
checkpoints that inference loads, bad labels, and a 2-process gloo run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ctcore.errors import UsageError
from hemorrhage.augment import AUGMENT_PRESETS, AugmentConfig
from hemorrhage.classes import CLASSES
from hemorrhage.inference_data import SeriesInputs, find_series
from hemorrhage.inputs import InputSettings, parse_tta
from hemorrhage.kaggle import LabelError, read_labels
from hemorrhage.metrics import baseline_log_loss, prior_baseline, weighted_log_loss
from hemorrhage.models.checkpoint import read_original_checkpoint
from hemorrhage.run.train_cnn import TrainConfig, lr_at, resolve_augment, run_training
from hemorrhage.synthetic.head import read_truth
from hemorrhage.train_data import (
    EpochDraws,
    TrainSeries,
    TrainSlices,
    load_or_make_folds,
    make_folds,
    triangular_weights,
)
from hemorrhage.windows import parse_window_spec
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
    """64 training studies (fold 0 of 5 validates) and 24 held-out ones: with 32 training studies the tiny
    model saw too few distinct heads to generalise; 24 test studies keep the held-out estimate steady."""
    root = tmp_path_factory.mktemp("train_sets")
    return synth(root / "train", 64, 3), synth(root / "test", 24, 4)


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


def test_augment_preset_is_the_models_unless_named():
    def cfg(**kw):
        return TrainConfig(labels=Path("x"), data_dir=Path("x"), output_dir=Path("x"), **kw)

    assert resolve_augment(cfg()) == "original"  # every published architecture trains as the original did
    assert resolve_augment(cfg(model="tiny_densenet")) == "light"
    assert resolve_augment(cfg(model="tiny_densenet", augment="original")) == "original"
    assert AUGMENT_PRESETS["original"] == AugmentConfig()
    light = AUGMENT_PRESETS["light"]
    assert light.p_shift_scale_rotate == 0 and light.p_erase == 0 and light.crop_ratio[0] < 0.8 < light.crop_ratio[1]
    with pytest.raises(UsageError, match="unknown augmentation preset 'heavy'; known: original, light"):
        run_training(cfg(model="tiny_densenet", augment="heavy"))


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The tiny model runs many small ops; when the CPU is shared, two OpenMP threads wait on each other at
    every one of them. With two busy processes beside it, the training fixture took 78 s with two threads
    and 32 s with one, inference of the test set 34 s and 4 s. Alone on 2 cores, one thread costs ~25%."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(head_sets, tmp_path_factory):
    train_set, _ = head_sets
    out = tmp_path_factory.mktemp("run")
    args = ["--config", TINY, "--labels", str(train_set / "labels.csv"), "--data_dir", str(train_set / "dicom"),
            "--output_dir", str(out), "--no_progress"]
    with one_torch_thread():
        assert train(args) == 0
    return out, args


def test_trained_checkpoint_beats_the_prior_on_held_out_studies(head_sets, trained):
    """The best checkpoint loads unchanged in hemorrhage_infer.py and its weighted log loss on the held-out
    studies is clearly below the prior's (constant training prevalences).

    Margin: over training seeds 0-9 (one thread; 0-3 also with two) the ratio ours / prior on these 24
    studies was 0.58-0.69 (mean 0.62, seed 0 the worst); 0.8 leaves room for thread-count and platform
    differences. The earlier tiny setup (two growth-8 blocks, the original's warp and erasing, 6 epochs
    ending at half the learning rate, 32 training studies) scored 1.0-1.1 on 12 and 48 held-out studies."""
    train_set, test_set = head_sets
    out, _ = trained
    pred = out / "infer" / "predictions.csv"
    with one_torch_thread():
        assert infer(["--data_dir", str(test_set / "dicom"), "--weights_dir", str(out), "--output", str(pred),
                      "--no_progress", "--num_workers", "0", "--device", "cpu"]) == 0
    p = pd.read_csv(pred).set_index("ID")["Label"]
    truth = read_labels(test_set / "labels.csv")
    probs = np.stack([p[[f"{s}_{c}" for s in truth.index]].to_numpy() for c in CLASSES], 1)
    ours = weighted_log_loss(truth.to_numpy(), probs)
    prior = baseline_log_loss(prior_baseline(read_labels(train_set / "labels.csv").to_numpy()), truth.to_numpy())
    print(f"held-out weighted log loss: tiny CNN {ours:.4f}, prior baseline {prior:.4f} (ratio {ours / prior:.3f})")
    assert ours < 0.8 * prior
    log = [json.loads(x) for x in (out / "tiny_densenet_64" / "train_log_0.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.85 * log[0]["train_loss"]


def test_training_samples_are_the_inference_inputs_with_their_labels(head_sets, trained):
    """Guards label/slice alignment, neighbour order and window: without augmentation a training sample is
    the inference input of the same slice read from the DICOM files (before the centre crop), and its labels
    are the generator's truth for that slice in position order."""
    train_set, _ = head_sets
    out, _ = trained
    jobs, _ = find_series(out / "prepared", progress=False)
    labels = read_labels(train_set / "labels.csv")
    series = [TrainSeries(j, labels.reindex(j.sop_uids).to_numpy(np.float32)) for j in jobs[:8]]
    off = AugmentConfig(p_reverse=0, p_hflip=0, p_shift_scale_rotate=0, p_erase=0, crop_ratio=(1, 1))
    samples = TrainSlices(series, 64, 0, off)
    dicom = {j.series_uid: j for j in find_series(train_set / "dicom", progress=False)[0]}
    settings = InputSettings(parse_window_spec("header"), (64,), parse_tta("0"), center_crop=1.0)
    inference = SeriesInputs([dicom[s.job.series_uid] for s in series], settings)
    for k, s in enumerate(series):
        truth = read_truth(train_set / "truth" / f"{s.job.series_uid}.npz")
        assert list(truth["sop_uids"]) == s.job.sop_uids  # truth files list slices in position order
        np.testing.assert_array_equal(s.labels, truth["labels"].astype(np.float32))
        expected = inference[k]["inputs"][64][0].numpy()
        for i in range(s.job.n_slices):
            x, y = samples[(k, i, 0, 0)]
            np.testing.assert_array_equal(x.numpy(), expected[i])
            np.testing.assert_array_equal(y.numpy(), truth["labels"][i].astype(np.float32))


def test_checkpoints_logs_and_resume(trained):
    out, args = trained
    member = out / "tiny_densenet_64"
    best = read_original_checkpoint(member / "model_epoch_best_0.pth")
    assert all(not k.startswith("module.") for k in best.state_dict)  # the reader strips the prefix
    raw = torch.load(member / "model_epoch_best_0.pth", weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "valLoss"} and all(k.startswith("module.") for k in raw["state_dict"])
    tiny = yaml.safe_load(Path(TINY).read_text())
    epochs = tiny["epochs"]
    lines = [json.loads(x) for x in (member / "train_log_0.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(epochs))
    val = [r["val_weighted_log_loss"] for r in lines]  # validated every epoch: the best one is the checkpoint
    assert raw["epoch"] == lines[-1]["best_epoch"] == int(np.argmin(val)) and raw["valLoss"] == pytest.approx(min(val))
    assert yaml.safe_load((member / "train_config_0.yaml").read_text())["augment"] == "light"
    assert (out / "folds.csv").is_file() and (out / "prepared" / "manifest.csv").is_file()
    # two more epochs from the saved state: the log continues, the schedule picks up where it stopped
    with one_torch_thread():
        assert train([*args, "--resume", "--epochs", str(epochs + 2)]) == 0
    lines = [json.loads(x) for x in (member / "train_log_0.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(epochs + 2))
    schedule = TrainConfig(Path(), Path(), Path(), lr=tiny["lr"], constant_epochs=tiny["constant_epochs"],
                           restart_period=tiny["restart_period"])
    assert lines[epochs]["lr"] == pytest.approx(lr_at(epochs, schedule))


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

"""benchmarks/bench_hemorrhage_train.py: the rate arithmetic, and main() end to end on tiny settings (no speed
target is asserted: timings on a shared CI machine are noise)."""

from __future__ import annotations

import json

import pytest
import torch.utils.data

import hemorrhage.run.train_cnn as train_cnn
from benchmarks.bench_hemorrhage_train import main
from benchmarks.hemorrhage_train_clock import EpochClock, measured_window

RATES = ("loader_images_per_s", "step_images_per_s", "end_to_end_images_per_s")


def test_measured_window_leaves_out_warmup_and_keeps_whole_rounds():
    assert measured_window(warmup=8, steps=60, workers=2) == (8, 68, 69)
    assert measured_window(warmup=8, steps=100, workers=16) == (16, 128, 129)  # at least one batch per worker
    assert measured_window(warmup=0, steps=5, workers=0) == (1, 6, 7)


def test_rate_over_whole_rounds_is_the_workers_rate():
    # two workers, each hands over a batch of 4 images every second: arrivals come in pairs
    clock = EpochClock(asked=[0.0] * 8, arrived=[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0], sizes=[4] * 8)
    first, last, _ = measured_window(warmup=0, steps=4, workers=2)
    rate, wait = clock.rate(first, last)
    assert rate == pytest.approx(8.0)  # 2 workers x 4 images / s
    assert clock.rate(2, 5)[0] == pytest.approx(12.0)  # a window that cuts a round overstates it
    loop = EpochClock(asked=[0.0, 1.5, 3.0], arrived=[1.0, 2.0, 3.5], sizes=[2, 2, 2])
    rate, wait = loop.rate(0, 2)
    assert rate == pytest.approx(4 / 2.5) and wait == pytest.approx((0.5 + 0.5) / 2.5)
    with pytest.raises(ValueError):
        loop.rate(1, 3)


@pytest.mark.parametrize("workers", [0, 1])
def test_main_writes_positive_rates(workers, synthetic_head, tmp_path):
    out = tmp_path / "bench.json"
    if workers == 0:  # an existing DICOM tree (with broken files and localizers)
        data = ["--data_dir", str(synthetic_head / "dicom"), "--labels", str(synthetic_head / "labels.csv")]
    else:  # the script's own synthetic studies, as the default run
        data = ["--n_studies", "2", "--size", "64", "--slices", "8"]
    rc = main([*data, "--device", "cpu", "--num_workers", str(workers), "--steps", "3", "--warmup", "1",
               "--batch_size", "4", "--repeats", "2", "--work_dir", str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert train_cnn.DataLoader is torch.utils.data.DataLoader  # the probe put training's class back
    assert r["device"] == "cpu" and r["machine"]["cpus_usable"] >= 1 and r["data"]["studies"] >= 2
    (row,) = r["rows"]
    assert (row["model"], row["input_size"], row["batch_size"], row["precision"]) == ("tiny_densenet", 64, 4, "fp32")
    assert row["workers"] == workers and row["measured_batches"] >= 3 and len(row["repeats"]) == 2
    for key in (*RATES, "logged_epoch_images_per_s"):
        assert row[key] > 0, key
    assert row["loader_over_step"] == pytest.approx(row["loader_images_per_s"] / row["step_images_per_s"])
    assert row["end_to_end_over_step"] == pytest.approx(row["end_to_end_images_per_s"] / row["step_images_per_s"])
    assert 0 <= row["end_to_end_data_wait_share"] < 1
    assert isinstance(row["loader_target_met"], bool)

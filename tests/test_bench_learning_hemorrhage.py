"""benchmarks/bench_learning_hemorrhage.py end to end at a tiny size (CNN on 2 folds, features, sequence head,
inference, evaluation, figure): the result's structure, its arithmetic and the report. No learning goal is
asserted here (one epoch on a handful of studies); tests/test_hemorrhage_train.py guards learning."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.bench_learning_hemorrhage import add_arguments, main, report, run
from hemorrhage.classes import CLASSES

TINY = ["--hem_n_train", "6", "--hem_n_test", "3", "--hem_size", "64", "--hem_slices", "8", "--hem_n_folds", "2",
        "--hem_epochs", "1", "--hem_head_epochs", "2", "--hem_n_bootstrap", "20"]


def test_main_writes_result_report_and_figure(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main([*TINY, "--work_dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())

    assert set(r["per_class"]) == set(CLASSES)
    for c in r["per_class"].values():
        assert 0 <= c["n_pos"] <= c["n"] == r["n_slices"] > 0
        assert c["log_loss"] > 0 and c["prior_log_loss"] > 0
    w = r["weighted_log_loss"]
    assert w["lower"] <= w["value"] <= w["upper"]
    assert math.isclose(r["ratio_to_prior"], w["value"] / r["prior_weighted_log_loss"])
    assert r["goal_met"] == (r["ratio_to_prior"] <= 0.5)
    assert r["model"]["folds_trained"] == [0, 1] and r["model"]["sequence_config"].endswith("sequence_learning.yaml")
    assert r["bootstrap"]["unit"] == "StudyInstanceUID" and r["bootstrap"]["n_units"] == 3

    expected = {"synthesize_train", "synthesize_test", "train_cnn_fold0", "train_cnn_fold1", "extract_features",
                "train_sequence_fold0", "train_sequence_fold1", "infer_test", "evaluate"}
    assert set(r["stages"]) == expected
    assert all(s["wall_s"] >= 0 and s["cpu_s"] >= 0 for s in r["stages"].values())
    assert r["stages"]["train_cnn_fold0"]["cpu_s"] > 0
    training = [s for s in expected if s.startswith(("train_", "extract_"))]
    assert r["training_cpu_s"] == pytest.approx(sum(r["stages"][s]["cpu_s"] for s in training), abs=0.1)

    png = (tmp_path / "work" / "hemorrhage_learning_curves.png")
    assert r["figure"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # the head ran 2 epochs with its MultiStepLR milestone at 2: both trained at sequence_learning.yaml's lr.
    # Regression: the log used to show the lr after the scheduler's step, the next epoch's (0.0003 at epoch 1).
    head_log = [json.loads(x) for x in (tmp_path / "work" / "sequence" / "train_log_0.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in head_log] == [0.003, 0.003]

    text = capsys.readouterr().out
    assert "| weighted log loss [95% CI] |" in text and "| subdural |" in text
    assert ("**met**" in text) == r["goal_met"] and ("**NOT met**" in text) != r["goal_met"]
    assert "command: `python benchmarks/bench_learning_hemorrhage.py --hem_n_train 6" in text
    assert report(r) in text


def test_flags_live_in_a_shared_parser_and_a_head_needs_every_fold(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--ctclip_steps", type=int, default=1)  # what the combined bench_learning.py adds beside them
    add_arguments(p.add_argument_group("hemorrhage"))  # as bench_learning.py calls it
    assert all(a.dest.startswith(("hem_", "ctclip_", "help")) for a in p._actions)
    flat = argparse.ArgumentParser()
    add_arguments(flat)  # a plain parser works too
    assert vars(flat.parse_args([])) == {k: v for k, v in vars(p.parse_args([])).items() if k.startswith("hem_")}
    args = p.parse_args([*TINY, "--hem_train_folds", "0"])
    with pytest.raises(ValueError, match="train every CNN fold"):
        run(args, tmp_path)
    args = p.parse_args([*TINY, "--hem_train_folds", "2"])
    with pytest.raises(ValueError, match="expected folds in 0..1"):
        run(args, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was made


def test_combined_script_runs_a_part_and_keeps_its_figure(tmp_path, capsys):
    """benchmarks/bench_learning.py: the parts' flags share one parser; without --work_dir the figure is
    copied next to the JSON before the temporary folder goes away."""
    from benchmarks.bench_learning import build_parser
    from benchmarks.bench_learning import main as combined

    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {"--part", "--hem_n_train", "--ctclip_budget_minutes"} <= flags
    out = tmp_path / "out" / "learning.json"
    assert combined(["--part", "hemorrhage", *TINY, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["parts"]) == ["hemorrhage"] and r["command"].startswith("python benchmarks/bench_learning.py --part")
    figure = r["parts"]["hemorrhage"]["figure"]
    assert figure.startswith(str(out.parent)) and (out.parent / "bench_learning_figures").is_dir()
    assert json.loads(out.read_text())["parts"]["hemorrhage"]["ratio_to_prior"] > 0
    assert "ratio to the prior" in capsys.readouterr().out

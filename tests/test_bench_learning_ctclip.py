"""The chest learning benchmark end to end at a toy size, and the training budget it relies on
(`--max_minutes`: the run stops at the budget, logs its clocks, and resumes with the budget used)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import bench_learning_ctclip as bench
from ctclip.run.train_utils import BudgetClock, cosine_with_warmup
from scripts.ctclip_train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


def _train_args(chest: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"), "--ct_filepath", str(chest / "train.h5"),
            "--txt_filepath", str(chest / "train_reports.csv"), "--output_dir", str(out), "--device", "cpu",
            "--log_interval", "1", *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_budget_stops_training_and_resume_keeps_the_used_budget(synthetic_chest, tmp_path):
    out = tmp_path / "run"
    # 0.02 min = 1.2 s of CPU: far fewer than the 10 000 steps asked for; warmup 1 step, so that the run
    # is past its warmup on a slow or busy machine too (2 threads on shared cores burn CPU time waiting)
    assert train_main(_train_args(synthetic_chest, out, "--max_steps", "10000", "--max_minutes", "0.02",
                                  "--warmup_steps", "1")) == 0
    recs = _records(out)
    train = [r for r in recs if r["kind"] == "train"]
    end = train[-1]
    assert end["stopped_by"] == "budget" and 1 <= end["step"] < 10000
    # stopped at the first step past the budget: every step logged, the last one the first over it (no upper
    # bound on the CPU time itself: the first step costs more on a loaded machine)
    assert train[-1]["budget_minutes"] >= 0.02
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all("stopped_by" not in r for r in train[:-1])
    assert all(r["cpu_minutes"] > 0 and r["wall_minutes"] > 0 for r in train)
    minutes = [r["budget_minutes"] for r in train]
    assert minutes == sorted(minutes)
    # the cosine followed the budget: the last step's learning rate is near 0, not the peak
    assert train[-1]["lr"] < 0.05 * 1e-3
    # a resumed run starts with the budget already used: it stops after one more step
    assert train_main(_train_args(synthetic_chest, out, "--max_steps", "10000", "--max_minutes", "0.02",
                                  "--warmup_steps", "1", "--resume", "latest")) == 0
    again = _records(out)[len(recs):]
    assert again[-1]["stopped_by"] == "budget" and again[-1]["step"] == end["step"] + 1
    assert again[-1]["budget_minutes"] >= end["budget_minutes"]  # counted on from the checkpoint


def test_wall_budget_bad_options_and_truncation_warning(synthetic_chest, tmp_path, caplog):
    assert train_main(_train_args(synthetic_chest, tmp_path / "w", "--max_steps", "10000", "--max_minutes", "0.01",
                                  "--budget_clock", "wall")) == 0
    assert _records(tmp_path / "w")[-1]["stopped_by"] == "budget"
    # findings + impressions of the synthetic reports are far longer than 77 tokens: said, not silent
    assert "longer than the context length 77" in caplog.text
    assert train_main(_train_args(synthetic_chest, tmp_path / "b", "--max_steps", "3", "--max_minutes", "-1")) == 2
    assert train_main(_train_args(synthetic_chest, tmp_path / "t", "--max_steps", "3", "--do_validate",
                                  "--val_ct_filepath", str(synthetic_chest / "valid.h5"),
                                  "--val_label_path", str(synthetic_chest / "valid_predicted_labels.csv"),
                                  "--val_templates", str(tmp_path / "missing.yaml"))) == 2


def test_budget_clock_pause_and_schedule():
    clock = BudgetClock(1.0, "wall")
    with clock.paused():
        inside = clock.used()
        sum(range(2_000_000))
    assert clock.used() - inside < 0.05  # the paused span is not counted
    progress = {"p": 0.0}
    f = cosine_with_warmup(2, 1000, lambda: progress["p"])
    assert f(0) == 0.5 and f(10) > 0.99
    progress["p"] = 1.0
    assert f(10) == pytest.approx(0.0)  # budget used up: the cosine is at its end, whatever the step
    with pytest.raises(ValueError, match="budget_clock"):
        BudgetClock(1.0, "gpu")


def test_benchmark_run_at_toy_size(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    synth = tmp_path / "synth.yaml"
    synth.write_text("n_patients: 14\nsize: [32, 32]\nslices: 12\nvalid_fraction: 0.45\nrecons_per_scan: [1, 1]\n"
                     "empty_impression_rate: 0.0\nintercept_8192_rate: 0.0\n")
    prep = tmp_path / "prep.yaml"
    prep.write_text("target_shape: [12, 32, 32]\nnum_workers: 0\n")
    args = parser.parse_args(["--ctclip_synth_config", str(synth), "--ctclip_preprocess_config", str(prep),
                              "--ctclip_budget_minutes", "0.02", "--ctclip_val_volumes", "2",
                              "--ctclip_n_bootstrap", "20", "--ctclip_valid_interval", "1000",
                              "--ctclip_batch_size", "4"])
    result = bench.run(args, tmp_path / "work")
    json.dumps(result)  # JSON-serialisable
    assert set(result["variants"]) == {"e2e", "cached"}
    for v in result["variants"].values():
        assert v["stopped_by"] == "budget" and v["steps"] >= 1
        auroc = v["test"]["mean_auroc"]
        assert auroc["n_findings"] >= 1 and 0.0 <= auroc["value"] <= 1.0
        assert Path(v["test"]["roc_figure"]).is_file()
        assert set(v["test"]["per_finding_auroc"]) <= set(bench_findings())
        proto = v["test"]["report_prototype_auroc"]
        assert set(proto["per_finding"]) <= set(bench_findings())
        assert all(0.0 <= x <= 1.0 for x in proto["per_finding"].values())
        text_side = v["test"]["report_text_auroc"]  # the split writes test_reports.csv
        assert set(text_side["per_finding"]) <= set(bench_findings()) and 0.0 <= text_side["mean"] <= 1.0
        probe = v["test"]["embedding_probe_auroc"]
        assert set(probe["per_finding"]) <= set(bench_findings()) and 0.0 <= probe["mean"] <= 1.0
    figure = Path(result["figure"])
    assert figure.is_file() and figure.stat().st_size > 10_000
    met = [v["test"]["mean_auroc"]["value"] >= 0.85 and min(v["test"]["per_finding_auroc"].values()) >= 0.7
           for v in result["variants"].values()]
    assert result["goal"]["met"] == any(met) and result["goal"]["min_finding_auroc"] == 0.7
    text = bench.report(result)
    assert "| end-to-end |" in text and "frozen backbone" in text and ("met" in text)
    assert "scored by report prototypes instead of prompts" in text and "what the text tower tells apart" in text
    assert "a linear probe on the frozen volume embeddings" in text
    assert result["machine"]["torch_threads"] == 1


def test_report_prototypes_read_the_joint_space_without_prompts(monkeypatch, tmp_path):
    """With embeddings that are the labels themselves (a perfect joint space), every finding scores near 1
    (not exactly: the prototype difference of finding k carries the training set's chance correlations with
    the others); with the test volumes' embeddings shuffled against their labels, about chance."""
    import numpy as np
    import pandas as pd
    import torch

    from benchmarks import bench_learning_ctclip_prototypes as proto
    from ctclip.findings import FINDINGS

    rng = np.random.default_rng(0)
    cols = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    train = pd.DataFrame(rng.integers(0, 2, (60, len(FINDINGS))), columns=list(FINDINGS))
    train.insert(0, "VolumeName", [f"train_{i}_a_1.nii.gz" for i in range(60)])
    test = pd.DataFrame(rng.integers(0, 2, (40, len(FINDINGS))), columns=list(FINDINGS))
    test.insert(0, "VolumeName", [f"valid_{i}_a_1.nii.gz" for i in range(40)])
    train.to_csv(tmp_path / "train_predicted_labels.csv", index=False)
    test.to_csv(tmp_path / "test_predicted_labels.csv", index=False)
    # each report's text names its volume, so the fake text tower can look its labels up
    pd.DataFrame([[n, "", "", f"Report of {n}.", ""] for n in train.VolumeName], columns=cols).to_csv(
        tmp_path / "train_reports.csv", index=False)
    text_labels = {n: row for n, row in zip(train.VolumeName, train[list(FINDINGS)].to_numpy(np.float32))}

    class FakeModel:
        def tokenize(self, texts):
            return texts

        def encode_text(self, texts):
            return torch.from_numpy(np.stack([text_labels[t.split("Report of ")[1].split(".nii")[0] + ".nii.gz"]
                                              for t in texts]))

    class FakeStore:
        def __init__(self, path):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def names(self):
            return list(test.VolumeName)

    volume_embeddings = torch.tensor(test[list(FINDINGS)].to_numpy(np.float32))
    monkeypatch.setattr(proto, "load_trained_model", lambda path: (FakeModel(), {"config": {}}))
    monkeypatch.setattr(proto, "VolumeStore", FakeStore)
    monkeypatch.setattr(proto, "_embed_volumes", lambda model, store, names: volume_embeddings)
    perfect = proto.report_prototype_aurocs(tmp_path / "latest.pt", tmp_path)
    assert set(perfect) == set(FINDINGS) and min(perfect.values()) > 0.95, perfect
    monkeypatch.setattr(proto, "_embed_volumes",
                        lambda model, store, names: volume_embeddings[torch.randperm(40, generator=torch.Generator().manual_seed(0))])
    shuffled = proto.report_prototype_aurocs(tmp_path / "latest.pt", tmp_path)
    assert 0.35 < np.mean(list(shuffled.values())) < 0.65, shuffled
    # the text side: without test_reports.csv nothing; with it, the test reports' own (here perfect) embeddings
    assert proto.prototype_aurocs(tmp_path / "latest.pt", tmp_path)["reports"] == {}
    pd.DataFrame([[n, "", "", f"Report of {n}.", ""] for n in test.VolumeName], columns=cols).to_csv(
        tmp_path / "test_reports.csv", index=False)
    text_labels.update({n: row for n, row in zip(test.VolumeName, test[list(FINDINGS)].to_numpy(np.float32))})
    both = proto.prototype_aurocs(tmp_path / "latest.pt", tmp_path)
    assert set(both["reports"]) == set(FINDINGS) and min(both["reports"].values()) > 0.95, both["reports"]
    assert 0.35 < np.mean(list(both["volumes"].values())) < 0.65  # the volumes are still shuffled


def test_embedding_probe_reads_what_the_volume_embeddings_carry(monkeypatch, tmp_path):
    """The linear probe on frozen volume embeddings: embeddings that are the labels plus noise read every finding
    near 1; with the test embeddings shuffled against their labels, about chance. Unknown labels are left out of
    their finding, a finding with one class on the test side is left out."""
    import numpy as np
    import pandas as pd
    import torch

    from benchmarks import bench_learning_ctclip_prototypes as proto
    from ctclip.findings import FINDINGS

    rng = np.random.default_rng(1)
    frames = {}
    for side, n in (("train", 120), ("valid", 60)):
        frame = pd.DataFrame(rng.integers(0, 2, (n, len(FINDINGS))).astype(float), columns=list(FINDINGS))
        frame.insert(0, "VolumeName", [f"{side}_{i}_a_1.nii.gz" for i in range(n)])
        frames[side] = frame
    frames["train"].loc[3, FINDINGS[0]] = np.nan  # unknown: left out of that finding's fit
    frames["valid"][FINDINGS[-1]] = 0.0  # one class on the test side: no AUROC
    frames["train"].to_csv(tmp_path / "train_predicted_labels.csv", index=False)
    frames["valid"].to_csv(tmp_path / "test_predicted_labels.csv", index=False)
    embeddings = {side: torch.tensor(np.nan_to_num(f[list(FINDINGS)].to_numpy(np.float32))
                                     + 0.3 * rng.standard_normal((len(f), len(FINDINGS))).astype(np.float32))
                  for side, f in frames.items()}

    class FakeStore:
        def __init__(self, path):
            self.side = "train" if "train" in path.name else "valid"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def names(self):
            return list(frames[self.side].VolumeName)

    def embed(model, store, names):
        assert names == list(frames[store.side].VolumeName)
        return embeddings[store.side]

    monkeypatch.setattr(proto, "load_trained_model", lambda path: (object(), {"config": {}}))
    monkeypatch.setattr(proto, "VolumeStore", FakeStore)
    monkeypatch.setattr(proto, "_embed_volumes", embed)
    read = proto.embedding_probe_aurocs(tmp_path / "latest.pt", tmp_path)
    assert set(read) == set(FINDINGS[:-1]) and min(read.values()) > 0.95, read
    embeddings["valid"] = embeddings["valid"][torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    shuffled = proto.embedding_probe_aurocs(tmp_path / "latest.pt", tmp_path)
    assert 0.35 < np.mean(list(shuffled.values())) < 0.65, shuffled


def bench_findings() -> tuple[str, ...]:
    from ctclip.findings import FINDINGS

    return FINDINGS


def test_settings_that_leave_no_test_side_are_refused_before_any_work(tmp_path, capsys, caplog):
    # 60 patients x 0.25 = 15 valid patients, all of them needed for 30 validation volumes: refused, nothing built
    assert bench.main(["--ctclip_n_patients", "60", "--work_dir", str(tmp_path / "w")]) == 2
    assert "15 valid patients" in caplog.text and "--ctclip_val_volumes" in caplog.text
    assert not (tmp_path / "w").exists()
    from benchmarks.bench_learning import main as all_main

    assert all_main(["--part", "ctclip", "--ctclip_n_patients", "60", "--work_dir", str(tmp_path / "a")]) == 2
    assert "15 valid patients" in capsys.readouterr().err and not (tmp_path / "a" / "ctclip").exists()
    # a set built earlier whose split left the test side empty: refused before training
    data = tmp_path / "set"
    data.mkdir()
    (data / "split_summary.json").write_text(json.dumps({"validation": {"volumes": 22}, "test": {"volumes": 0}}))
    assert bench.main(["--ctclip_data_dir", str(data), "--work_dir", str(tmp_path / "w2")]) == 2
    assert "test 0 volumes" in caplog.text and not (tmp_path / "w2" / "train_e2e").exists()

"""scripts/demo_summary.py: the demo's closing report reads the steps' outputs and lists every file."""

from __future__ import annotations

import json

import pytest

from scripts.demo_summary import main as summary


def _head_metrics(wll: tuple[float, float, float], mean_auroc: float, any_auroc: float) -> str:
    return json.dumps({
        "weighted_log_loss": dict(zip(("value", "lower", "upper"), wll)),
        "baseline": {"weighted_log_loss": 0.4},
        "mean_auroc": {"value": mean_auroc, "lower": mean_auroc - 0.1, "upper": mean_auroc + 0.05,
                       "n_classes": 5},
        "per_class": {"any": {"auroc": any_auroc}, "epidural": {"auroc": None}},
        "bootstrap": {"ci": 0.95, "n_units": 48}, "matching": {"n_slices_evaluated": 1095}})


@pytest.fixture
def demo(tmp_path):
    """A demo folder with every output the summary reads (the numbers are made up)."""
    demo = tmp_path / "demo"
    for d in ("ctclip_eval", "ctclip_train", "hemorrhage_eval", "hemorrhage_eval_cnn", "hemorrhage_sequence"):
        (demo / d).mkdir(parents=True)
    (demo / "rsna" / "dicom" / "a" / "b").mkdir(parents=True)
    for i in range(3):
        (demo / "rsna" / "dicom" / "a" / "b" / f"IM{i}").write_bytes(b"x")
    (demo / "hemorrhage_features" / "features" / "fold0").mkdir(parents=True)
    for i in range(2):
        (demo / "hemorrhage_features" / "features" / "fold0" / f"s{i}.npz").write_bytes(b"x")
    (demo / "hemorrhage_features" / "features_index.csv").write_text("path\n")
    (demo / "ctclip_eval" / "summary.json").write_text(json.dumps(
        {"n_units": 60, "macro": {"auroc": {"value": 0.91, "lower": 0.86, "upper": 0.95, "n_findings": 8}},
         "excluded_findings": ["Hiatal hernia"]}))
    (demo / "ctclip_train" / "train_log.jsonl").write_text(
        '{"kind": "train", "step": 5, "loss": 2.0}\n{"kind": "valid", "step": 5}\n{"kind": "train", "step": 10, "loss": 1.5}\n')
    (demo / "hemorrhage_eval_cnn" / "metrics.json").write_text(_head_metrics((0.2, 0.15, 0.25), 0.9, 0.93))
    (demo / "hemorrhage_eval" / "metrics.json").write_text(_head_metrics((0.16, 0.12, 0.2), 0.92, 0.95))
    for k, losses in ((0, (0.3, 0.17, 0.18)), (1, (0.25, 0.24, 0.22))):
        rows = [{"epoch": e, "train_loss": 1.0, "val_weighted_log_loss": v, "cnn_val_weighted_log_loss": 0.2}
                for e, v in enumerate(losses)]
        log = "".join(json.dumps(r) + "\n" for r in rows)
        (demo / "hemorrhage_sequence" / f"train_log_{k}.jsonl").write_text(log)
    (demo / "hemorrhage_sequence" / "sequence_fold0.pth").write_bytes(b"x")
    return demo


def test_summary_reports_numbers_and_outputs(demo, tmp_path, capsys):
    out = tmp_path / "numbers.json"
    assert summary(["--demo_dir", str(demo), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "10 training steps, loss 2.000 -> 1.500" in text
    assert "macro AUROC on 60 held-out test volumes" in text and "0.910 [0.860, 0.950]" in text
    # both held-out scores side by side: loss with CI, ratio to the prior, mean AUROC with CI
    assert "48 held-out studies, 1095 slices" in text
    lines = text.splitlines()
    header = next(line for line in lines if "weighted log loss [95% CI]" in line)
    assert "ratio to prior" in header and "mean AUROC [95% CI]" in header
    prior = next(line for line in lines if line.strip().startswith("prevalence prior"))
    cnn = next(line for line in lines if line.strip().startswith("CNN alone"))
    head = next(line for line in lines if line.strip().startswith("CNN + sequence head"))
    assert "0.4000" in prior
    assert "0.2000 [0.1500, 0.2500]" in cnn and "0.50" in cnn and "0.900 [0.800, 0.950]" in cnn
    assert "0.1600 [0.1200, 0.2000]" in head and "0.40" in head and "0.920 [0.820, 0.970]" in head
    # the columns line up
    assert cnn.index("0.2000") == head.index("0.1600") == header.index("weighted log loss")
    assert "AUROC per class, CNN alone: any 0.93" in text
    assert "AUROC per class, CNN + sequence head: any 0.95" in text
    assert "epidural" not in text.split("AUROC per class")[1]
    # the heads' own validation (best epoch of each fold) next to the CNN alone on the same slices
    assert "fold 0 0.1700 vs CNN alone 0.2000 (epoch 2 of 3)" in text
    assert "fold 1 0.2200 vs CNN alone 0.2000 (epoch 3 of 3)" in text
    # every output: bulk folders as one line, the new head outputs listed
    assert f"{demo / 'rsna' / 'dicom'}/  (3 files)" in text
    assert f"{demo / 'hemorrhage_features' / 'features'}/  (2 files)" in text
    for path in ("ctclip_eval/summary.json", "hemorrhage_eval_cnn/metrics.json", "hemorrhage_eval/metrics.json",
                 "hemorrhage_sequence/sequence_fold0.pth", "hemorrhage_features/features_index.csv"):
        assert str(demo / path) in text
    numbers = json.loads(out.read_text())["head"]
    assert numbers["cnn"]["ratio_to_prior"] == 0.5
    assert numbers["cnn_sequence_head"]["ratio_to_prior"] == pytest.approx(0.4)
    assert numbers["sequence_validation"]["0"]["best_epoch"] == 1


@pytest.mark.parametrize("missing", ["ctclip_eval/summary.json", "hemorrhage_eval_cnn/metrics.json",
                                     "hemorrhage_eval/metrics.json"])
def test_a_missing_output_is_a_clear_error(demo, capsys, missing):
    (demo / missing).unlink()
    assert summary(["--demo_dir", str(demo)]) == 2  # the step that writes it did not finish
    err = capsys.readouterr().err
    assert f"{demo / missing}: missing (the step that writes it did not finish)" in err

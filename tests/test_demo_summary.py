"""scripts/demo_summary.py: the demo's closing report reads the steps' outputs and lists every file."""

from __future__ import annotations

import json

from scripts.demo_summary import main as summary


def test_summary_reports_numbers_and_outputs(tmp_path, capsys):
    demo = tmp_path / "demo"
    (demo / "ctclip_eval").mkdir(parents=True)
    (demo / "ctclip_train").mkdir()
    (demo / "hemorrhage_eval").mkdir()
    (demo / "rsna" / "dicom" / "a" / "b").mkdir(parents=True)
    for i in range(3):
        (demo / "rsna" / "dicom" / "a" / "b" / f"IM{i}").write_bytes(b"x")
    assert summary(["--demo_dir", str(demo)]) == 2  # nothing evaluated yet
    assert "summary.json: missing" in capsys.readouterr().err
    (demo / "ctclip_eval" / "summary.json").write_text(json.dumps(
        {"n_units": 60, "macro": {"auroc": {"value": 0.91, "lower": 0.86, "upper": 0.95, "n_findings": 8}},
         "excluded_findings": ["Hiatal hernia"]}))
    (demo / "ctclip_train" / "train_log.jsonl").write_text(
        '{"kind": "train", "step": 5, "loss": 2.0}\n{"kind": "valid", "step": 5}\n{"kind": "train", "step": 10, "loss": 1.5}\n')
    (demo / "hemorrhage_eval" / "metrics.json").write_text(json.dumps(
        {"weighted_log_loss": {"value": 0.2, "lower": 0.15, "upper": 0.25},
         "baseline": {"weighted_log_loss": 0.4},
         "mean_auroc": {"value": 0.9, "lower": 0.8, "upper": 0.95},
         "per_class": {"any": {"auroc": 0.93}, "epidural": {"auroc": None}}}))
    out = tmp_path / "numbers.json"
    assert summary(["--demo_dir", str(demo), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "10 training steps, loss 2.000 -> 1.500" in text
    assert "macro AUROC on 60 held-out test volumes" in text and "0.910 [0.860, 0.950]" in text
    assert "ratio 0.50" in text and "any 0.93" in text and "epidural" not in text.split("per class:")[1]
    assert f"{demo / 'rsna' / 'dicom'}/  (3 files)" in text
    assert str(demo / "ctclip_eval" / "summary.json") in text
    assert json.loads(out.read_text())["head"]["ratio_to_prior"] == 0.5

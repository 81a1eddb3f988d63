"""hemorrhage.metrics against plain sklearn oracles, and scripts/hemorrhage_eval.py end to end."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

import hemorrhage.metrics as hm
from hemorrhage.classes import CLASS_WEIGHTS, CLASSES
from scripts.hemorrhage_eval import main

W = np.asarray(CLASS_WEIGHTS)


def clustered(rng: np.random.Generator, n_groups: int = 30, per_group: int = 20, decimals: int | None = 1,
              signal: float = 0.2):
    """Slices of one group share labels and nearly share scores (strong within-group correlation)."""
    base_y = (rng.random((n_groups, 6)) < 0.3).astype(float)
    base_y[:, 0] = base_y[:, 1:].max(axis=1)
    y = np.repeat(base_y, per_group, axis=0)
    p = np.clip(signal * y + 0.5 * np.repeat(rng.random((n_groups, 6)), per_group, axis=0)
                + 0.05 * rng.random(y.shape), 0, 1)
    if decimals is not None:
        p = p.round(decimals)  # many tied scores
    return y, p, np.repeat(np.arange(n_groups), per_group)


# ---- the competition metric ----------------------------------------------------------------------

def test_weighted_log_loss_equals_sklearn_on_flattened_entries():
    rng = np.random.default_rng(0)
    y = (rng.random((500, 6)) < 0.2).astype(float)
    p = rng.random((500, 6))
    p[:5] = 0.0  # exercises the clipping
    p[5:10] = 1.0
    ours = hm.weighted_log_loss(y, p)
    clipped = np.clip(p, hm.EPS, 1 - hm.EPS)
    ref = log_loss(y.ravel(), clipped.ravel(), sample_weight=np.tile(W, len(y)), labels=[0, 1])
    assert abs(ours - ref) < 1e-9
    assert abs(hm.weighted_log_loss(y, p, weights=[1] * 6) - log_loss(y.ravel(), clipped.ravel())) < 1e-9


def test_weighted_log_loss_equals_double_loop():
    rng = np.random.default_rng(1)
    y = (rng.random((40, 6)) < 0.4).astype(float)
    p = rng.random((40, 6))
    total = 0.0
    for c in range(6):
        loss = 0.0
        for i in range(40):
            q = min(max(p[i, c], 1e-7), 1 - 1e-7)
            loss -= np.log(q) if y[i, c] == 1 else np.log(1 - q)
        total += CLASS_WEIGHTS[c] * loss / 40
    assert abs(hm.weighted_log_loss(y, p) - total / sum(CLASS_WEIGHTS)) < 1e-12
    assert np.allclose(hm.per_class_log_loss(y, p) @ W / W.sum(), total / sum(CLASS_WEIGHTS), atol=1e-12)
    with pytest.raises(ValueError, match="0 or 1"):
        hm.weighted_log_loss(y + 0.5, p)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        hm.weighted_log_loss(y[:, :5], p[:, :5])


def test_prior_baseline_is_the_prevalence_and_the_best_constant():
    rng = np.random.default_rng(2)
    y_train = (rng.random((1000, 6)) < [0.15, 0.01, 0.05, 0.04, 0.05, 0.06]).astype(float)
    prior = hm.prior_baseline(y_train)
    assert np.allclose(prior, y_train.mean(axis=0))
    base = hm.baseline_log_loss(prior, y_train)
    assert base == pytest.approx(hm.weighted_log_loss(y_train, np.tile(prior, (1000, 1))), abs=1e-12)
    for delta in (-0.005, 0.005):  # on its own set the prevalence is the best constant predictor
        assert hm.baseline_log_loss(np.clip(prior + delta, 0.001, 1), y_train) > base


# ---- bootstrap -----------------------------------------------------------------------------------

@pytest.mark.parametrize("decimals", [1, None])
def test_every_resample_auroc_equals_sklearn(decimals):
    rng = np.random.default_rng(3)
    y, p, groups = clustered(rng, n_groups=12, per_group=6, decimals=decimals)
    codes = hm.group_codes(groups, len(y))
    weights = hm.bootstrap_counts_per_resample(codes.max() + 1, 0, 100, seed=5)[:, codes]
    n_undefined = 0
    for c in range(6):
        ours = hm.resample_auroc(y[:, c], p[:, c], weights)
        ours_float = hm.resample_auroc(y[:, c], p[:, c], weights.astype(float) * 0.5)
        for b in range(len(weights)):
            yw = y[weights[b] > 0, c]
            if yw.min() == yw.max():
                assert np.isnan(ours[b]) and np.isnan(ours_float[b])
                n_undefined += 1
                continue
            ref = roc_auc_score(y[:, c], p[:, c], sample_weight=weights[b])
            assert abs(ours[b] - ref) < 1e-12 and abs(ours_float[b] - ref) < 1e-12
    assert n_undefined > 0  # the one-class case was exercised
    assert len(np.unique(p)) < len(p) / 2 or decimals is None


def test_bootstrap_intervals_equal_percentiles_of_the_sklearn_oracle(monkeypatch):
    monkeypatch.setattr(hm, "BLOCK_ELEMENTS", 1000)  # several blocks of resamples
    rng = np.random.default_rng(4)
    y, p, groups = clustered(rng, n_groups=15, per_group=8)
    y[:, 1] = 0
    y[3, 1] = 1  # epidural: one positive slice, many resamples without it
    res = hm.bootstrap_metrics(y, p, groups=groups, n_bootstrap=100, ci=0.9, seed=7)
    codes = hm.group_codes(groups, len(y))
    weights = hm.bootstrap_counts_per_resample(codes.max() + 1, 0, 100, seed=7)[:, codes]
    clipped = np.clip(p, hm.EPS, 1 - hm.EPS)
    aurocs = np.full((100, 6), np.nan)
    wll = np.empty(100)
    for b, w in enumerate(weights):
        for c in range(6):
            if len(np.unique(y[w > 0, c])) == 2:
                aurocs[b, c] = roc_auc_score(y[:, c], p[:, c], sample_weight=w)
        wll[b] = log_loss(y.ravel(), clipped.ravel(), sample_weight=np.outer(w, W).ravel(), labels=[0, 1])
    for c, name in enumerate(CLASSES):
        r = res["per_class"][name]
        lo, hi = np.nanpercentile(aurocs[:, c], [5, 95])
        assert abs(r["lower"] - lo) < 1e-12 and abs(r["upper"] - hi) < 1e-12
        assert r["n_resamples_undefined"] == int(np.isnan(aurocs[:, c]).sum())
        assert r["auroc"] == pytest.approx(roc_auc_score(y[:, c], p[:, c]), abs=1e-12)
        assert (r["n"], r["n_pos"]) == (len(y), int(y[:, c].sum()))
    assert res["per_class"]["epidural"]["n_resamples_undefined"] > 10
    lo, hi = np.percentile(wll, [5, 95])
    assert abs(res["weighted_log_loss"]["lower"] - lo) < 1e-9 and abs(res["weighted_log_loss"]["upper"] - hi) < 1e-9
    assert res["weighted_log_loss"]["value"] == pytest.approx(hm.weighted_log_loss(y, p), abs=1e-12)
    assert (res["n_units"], res["unit"]) == (15, "group")


def test_cluster_bootstrap_is_wider_than_slice_bootstrap_on_clustered_data():
    y, p, groups = clustered(np.random.default_rng(5), n_groups=30, per_group=20, decimals=None)
    cluster = hm.auroc_with_ci(y, p, groups=groups, n_bootstrap=300)
    plain = hm.auroc_with_ci(y, p, n_bootstrap=300)
    for name in CLASSES:
        assert cluster[name]["auroc"] == plain[name]["auroc"]
        width_c = cluster[name]["upper"] - cluster[name]["lower"]
        width_p = plain[name]["upper"] - plain[name]["lower"]
        assert width_c > 2 * width_p, name


def test_seed_reproducible_and_independent_of_block_size(monkeypatch):
    y, p, groups = clustered(np.random.default_rng(6), n_groups=10, per_group=5)
    a = hm.bootstrap_metrics(y, p, groups=groups, n_bootstrap=100, seed=3)
    assert hm.bootstrap_metrics(y, p, groups=groups, n_bootstrap=100, seed=3) == a
    assert hm.bootstrap_metrics(y, p, groups=groups, n_bootstrap=100, seed=4) != a
    assert 0.6 < a["mean_auroc"]["value"] < 0.99
    counts = hm.bootstrap_counts_per_resample(10, 0, 100, seed=3)  # each resample draws 10 groups, resamples differ
    assert (counts.sum(axis=1) == 10).all() and len(np.unique(counts, axis=0)) > 95
    assert (hm.bootstrap_counts_per_resample(10, 40, 60, seed=3) == counts[40:60]).all()
    monkeypatch.setattr(hm, "BLOCK_ELEMENTS", 60)  # 1 resample per block instead of 100
    b = hm.bootstrap_metrics(y, p, groups=groups, n_bootstrap=100, seed=3)
    for name in CLASSES:  # AUROCs are exact; log loss matrix products may differ in the last bit
        numbers = {k: v for k, v in a["per_class"][name].items() if k != "reason"}
        assert {k: b["per_class"][name][k] for k in numbers} == pytest.approx(numbers, rel=1e-12, nan_ok=True)
        assert b["per_class"][name]["auroc"] == a["per_class"][name]["auroc"]
    assert b["weighted_log_loss"] == pytest.approx(a["weighted_log_loss"], rel=1e-12)


def test_class_with_one_label_value_is_nan_with_a_reason():
    y, p, groups = clustered(np.random.default_rng(7), n_groups=8, per_group=4)
    y[:, 2] = 0
    res = hm.auroc_with_ci(y, p, groups=groups, n_bootstrap=50)
    r = res["intraparenchymal"]
    assert np.isnan(r["auroc"]) and np.isnan(r["lower"]) and "only one label value (all 0)" in r["reason"]
    assert r["n_resamples_undefined"] == 50 and r["n_pos"] == 0
    assert res["any"]["reason"] is None and not np.isnan(res["any"]["auroc"])


# ---- the script ----------------------------------------------------------------------------------

def make_set(rng: np.random.Generator, n_studies: int = 6, per_study: int = 10):
    y, p, study = clustered(rng, n_groups=n_studies, per_group=per_study, decimals=3)
    sops = [f"ID_{s}x{k:02d}" if s % 2 else f"1.2.840.{s}.{k}" for s in range(n_studies) for k in range(per_study)]
    per_slice = pd.DataFrame({"StudyInstanceUID": [f"study{s}" for s in study],
                              "SeriesInstanceUID": [f"series{s}.{k % 2}" for s, k in zip(study, range(len(study)))],
                              "SOPInstanceUID": sops})
    return sops, y, p, per_slice


def kaggle(path, sops, values, drop: int = 0):
    rows = [(f"{sop}_{c}", v) for sop, row in zip(sops, values) for c, v in zip(CLASSES, row)]
    pd.DataFrame(rows[drop:], columns=["ID", "Label"]).to_csv(path, index=False)
    return path


@pytest.fixture
def eval_set(tmp_path):
    sops, y, p, per_slice = make_set(np.random.default_rng(8))
    per_slice.to_csv(tmp_path / "per_slice.csv", index=False)
    return {"sops": sops, "y": y, "p": p, "dir": tmp_path,
            "pred": kaggle(tmp_path / "pred.csv", sops, p),
            "labels": kaggle(tmp_path / "labels.csv", sops, y.astype(int)),
            "per_slice": tmp_path / "per_slice.csv", "out": tmp_path / "out"}


def run(s, *extra) -> int:
    return main(["--predictions", str(s["pred"]), "--labels", str(s["labels"]), "--output_dir", str(s["out"]),
                 "--n_bootstrap", "200", *map(str, extra)])


def test_eval_end_to_end_matches_sklearn(eval_set, capsys):
    s = eval_set
    assert run(s, "--per_slice", s["per_slice"]) == 0
    line = capsys.readouterr().out.strip()
    m = json.loads((s["out"] / "metrics.json").read_text())
    y, p = s["y"], s["p"]
    ref = log_loss(y.ravel(), np.clip(p, 1e-7, 1 - 1e-7).ravel(), sample_weight=np.tile(W, len(y)), labels=[0, 1])
    assert abs(m["weighted_log_loss"]["value"] - ref) < 1e-9
    assert m["weighted_log_loss"]["lower"] < ref < m["weighted_log_loss"]["upper"]
    for c, name in enumerate(CLASSES):
        r = m["per_class"][name]
        assert abs(r["auroc"] - roc_auc_score(y[:, c], p[:, c])) < 1e-12
        assert r["lower"] <= r["auroc"] <= r["upper"] and r["n"] == 60 and r["n_pos"] == int(y[:, c].sum())
    mean = np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(6)])
    assert abs(m["mean_auroc"]["value"] - mean) < 1e-12
    assert m["bootstrap"]["unit"] == "StudyInstanceUID" and m["bootstrap"]["n_units"] == 6
    assert m["baseline"]["weighted_log_loss"] == pytest.approx(hm.baseline_log_loss(y.mean(0), y), abs=1e-12)
    assert "evaluated labels" in m["baseline"]["source"]
    assert m["matching"]["n_ids_matched"] == 360 and m["matching"]["n_ids_only_in_labels"] == 0
    for role, key in (("predictions", "pred"), ("labels", "labels")):
        assert m["inputs"][role]["sha256"] == hashlib.sha256(s[key].read_bytes()).hexdigest()
    assert m["settings"]["n_bootstrap"] == 200
    table = pd.read_csv(s["out"] / "metrics.csv")
    assert list(table["class"]) == [*CLASSES, "weighted/macro"]
    assert table["log_loss"].iloc[-1] == pytest.approx(ref, abs=1e-9)
    assert (s["out"] / "roc_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"weighted log loss {ref:.4f}" in line and f"mean AUROC {mean:.4f}" in line and "\n" not in line


def test_eval_groups_by_series_and_says_when_it_resamples_slices(eval_set, caplog):
    s = eval_set
    assert run(s, "--per_slice", s["per_slice"], "--group_column", "SeriesInstanceUID") == 0
    m = json.loads((s["out"] / "metrics.json").read_text())
    assert m["bootstrap"]["unit"] == "SeriesInstanceUID" and m["bootstrap"]["n_units"] == 12
    assert run(s) == 0
    m = json.loads((s["out"] / "metrics.json").read_text())
    assert m["bootstrap"]["unit"] == "slice" and m["bootstrap"]["n_units"] == 60
    assert "too narrow" in m["bootstrap"]["note"] and "too narrow" in caplog.text


def test_eval_train_labels_baseline_and_config(eval_set, tmp_path):
    s = eval_set
    y_train = (np.random.default_rng(9).random((40, 6)) < 0.1).astype(int)
    train = kaggle(tmp_path / "train.csv", [f"t{i}" for i in range(40)], y_train)
    config = tmp_path / "eval.yaml"
    config.write_text("n_bootstrap: 50\nseed: 3\n")
    assert main(["--config", str(config), "-p", str(s["pred"]), "-l", str(s["labels"]), "-o", str(s["out"]),
                 "--train_labels", str(train)]) == 0
    m = json.loads((s["out"] / "metrics.json").read_text())
    assert m["baseline"]["source"] == "train labels' prevalence"
    expected = hm.baseline_log_loss(y_train.mean(0), s["y"])
    assert m["baseline"]["weighted_log_loss"] == pytest.approx(expected, abs=1e-12)
    assert (m["settings"]["n_bootstrap"], m["settings"]["seed"]) == (50, 3)


def test_eval_reports_ids_in_one_file_only(eval_set, caplog):
    s = eval_set
    sops, y, p = s["sops"], s["y"], s["p"]
    kaggle(s["pred"], sops + ["ID_extra1", "ID_extra2"], np.vstack([p, p[:2]]))  # 2 extra slices
    pred = pd.read_csv(s["pred"], dtype=str)
    pred[pred["ID"] != f"{sops[-1]}_subdural"].to_csv(s["pred"], index=False)  # last slice: 5 predictions
    kaggle(s["labels"], sops, y.astype(int), drop=2)  # the first slice lacks two label rows
    assert run(s, "--per_slice", s["per_slice"]) == 0
    metrics = json.loads((s["out"] / "metrics.json").read_text())
    m = metrics["matching"]
    assert m["n_ids_only_in_predictions"] == 14 and m["n_ids_only_in_labels"] == 1
    assert "ID_extra1_any" in m["examples_only_in_predictions"]
    assert m["examples_only_in_labels"] == [f"{sops[-1]}_subdural"]
    assert m["incomplete_slices"] == {"labels": {"n": 1, "examples": [sops[0]]},
                                      "predictions": {"n": 1, "examples": [sops[-1]]}}
    assert m["n_slices_evaluated"] == 58 and m["n_ids_matched"] == 357
    assert "14 only in predictions" in caplog.text and "1 only in labels" in caplog.text
    keep = np.arange(1, 59)  # the first and last slices are incomplete; row order does not change the metrics
    assert abs(metrics["weighted_log_loss"]["value"] - hm.weighted_log_loss(y[keep], p[keep])) < 1e-12
    assert abs(metrics["per_class"]["any"]["auroc"] - roc_auc_score(y[keep, 0], p[keep, 0])) < 1e-12


def test_identical_duplicate_rows_are_collapsed_and_counted(eval_set):
    s = eval_set
    df = pd.read_csv(s["labels"], dtype=str)
    pd.concat([df, df.iloc[:3]]).to_csv(s["labels"], index=False)
    assert run(s) == 0
    m = json.loads((s["out"] / "metrics.json").read_text())["matching"]
    assert m["n_duplicate_rows_collapsed"] == {"predictions": 0, "labels": 3} and m["n_slices_evaluated"] == 60


def _rewrite(path, row: int, id_=None, label=None, columns=None):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if id_ is not None:
        df.loc[row, "ID"] = id_
    if label is not None:
        df.loc[row, "Label"] = label
    if columns is not None:
        df.columns = columns
    df.to_csv(path, index=False)


@pytest.mark.parametrize("which, edit, message", [
    ("labels", dict(columns=["Id", "Label"]), "no column ID"),
    ("pred", dict(columns=["ID", "Probability"]), "no column Label"),
    ("pred", dict(row=4, label="abc"), "line 6 .*not a number"),
    ("labels", dict(row=7, label="NaN"), "line 9 .*not a number"),
    ("pred", dict(row=2, label=""), "line 4 .*not a number"),
    ("labels", dict(row=3, label="2"), "line 5 .*must be 0 or 1"),
    ("labels", dict(row=3, label="0.5"), "line 5 .*must be 0 or 1"),
    ("pred", dict(row=10, label="1.5"), "line 12 .*within \\[0, 1\\]"),
    ("pred", dict(row=10, label="-0.1"), "line 12 .*within \\[0, 1\\]"),
    ("pred", dict(row=0, id_="ID_abc_hemorrhage"), "line 2: not a label id"),
    ("labels", dict(row=5, id_="ID_abc"), "line 7: not a label id"),
    ("pred", dict(row=1, id_="1.2.840.0.0_any", label="0.123456"),
     "duplicate ID '1.2.840.0.0_any' .*lines \\[2, 3\\]"),
])
def test_bad_input_exits_2_naming_file_and_line(eval_set, caplog, which, edit, message):
    s = eval_set
    _rewrite(s[which], **{"row": 0, **edit})
    assert run(s) == 2
    assert s[which].name in caplog.text
    assert re.search(message, caplog.text), caplog.text
    assert not (s["out"] / "metrics.json").exists()


def test_bad_input_without_a_row(eval_set, caplog, tmp_path):
    s = eval_set
    kaggle(s["pred"], [f"other{i}" for i in range(5)], s["p"][:5])
    assert run(s) == 2 and "no slice has all six classes in both" in caplog.text
    s["pred"] = tmp_path / "missing.csv"
    assert run(s) == 2 and "missing.csv: no such file" in caplog.text
    (tmp_path / "empty.csv").write_text("ID,Label\n")
    s["pred"] = tmp_path / "empty.csv"
    assert run(s) == 2 and "empty.csv: no rows" in caplog.text


def test_bad_per_slice_file(eval_set, caplog):
    s = eval_set
    ps = pd.read_csv(s["per_slice"])
    ps.iloc[:-1].to_csv(s["per_slice"], index=False)
    assert run(s, "--per_slice", s["per_slice"]) == 2 and "1 evaluated slices have no row" in caplog.text
    assert run(s, "--per_slice", s["per_slice"], "--group_column", "PatientID") == 2
    assert "no column 'PatientID'" in caplog.text
    with caplog.at_level(logging.ERROR):
        ps.assign(StudyInstanceUID=ps["StudyInstanceUID"].where(ps.index != 3, "")).to_csv(s["per_slice"], index=False)
        assert run(s, "--per_slice", s["per_slice"]) == 2 and "line 5: empty StudyInstanceUID" in caplog.text

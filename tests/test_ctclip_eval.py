"""scripts/ctclip_eval.py end to end on a tiny model trained on the synthetic chest set, plus the
pieces it is made of (templates, scan aggregation, retrieval) against independent references."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from ctclip.checkpoint import load_trained_model
from ctclip.data.store import VolumeStore
from ctclip.findings import FINDINGS
from ctclip.metrics import evaluate_findings
from ctclip.retrieval import recall_at_k, text_gallery
from ctclip.run.eval_outputs import file_sha256
from ctclip.zeroshot import (
    TEMPLATE_PRESETS,
    aggregate_by_scan,
    load_templates,
    prompt_features,
    scan_of,
    zero_shot_margins,
    zero_shot_scores,
)
from scripts.ctclip_eval import main as eval_main
from scripts.ctclip_train import main as train_main
from tests.test_ctclip_train import ROOT


@pytest.fixture(scope="module")
def trained(synthetic_chest, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert train_main(["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"), "--ct_filepath",
                       str(synthetic_chest / "train.h5"), "--txt_filepath", str(synthetic_chest / "train_reports.csv"),
                       "--output_dir", str(out), "--device", "cpu", "--max_steps", "30"]) == 0
    return out / "latest.pt"


def _eval_args(chest, model, out, *extra, labels="train_predicted_labels.csv"):
    """Evaluated on the training store: 22 volumes give the resamples something to do."""
    return ["--model_path", str(model), "--test_data", str(chest / "train.h5"), "--test_labels", str(chest / labels),
            "--output_dir", str(out), "--device", "cpu", "--num_workers", "0", "--n_bootstrap", "200", *extra]


# a finding no evaluated volume has, as in a small test split: it must be reported undefined, not averaged
ABSENT = "Hiatal hernia"


@pytest.fixture(scope="module")
def standard_labels(synthetic_chest, tmp_path_factory):
    labels = pd.read_csv(synthetic_chest / "train_predicted_labels.csv")
    path = tmp_path_factory.mktemp("labels") / "labels_one_absent.csv"
    labels.assign(**{ABSENT: 0}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def standard_run(synthetic_chest, trained, standard_labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert eval_main(_eval_args(synthetic_chest, trained, out, "--reports",
                                str(synthetic_chest / "train_reports.csv"), labels=str(standard_labels))) == 0
    return out


def test_outputs_are_complete_and_consistent(synthetic_chest, trained, standard_labels, standard_run):
    out = standard_run
    labels = pd.read_csv(standard_labels).set_index("VolumeName")
    scores = pd.read_csv(out / "scores.csv").set_index("VolumeName")
    assert list(scores.columns) == list(FINDINGS) and sorted(scores.index) == sorted(labels.index)
    assert ((scores >= 0) & (scores <= 1)).all().all()

    # scores.csv rows belong to the right volumes: recompute two of them directly from the checkpoint
    model, _ = load_trained_model(trained)
    prompts = prompt_features(model, FINDINGS, TEMPLATE_PRESETS["ctclip"])
    with VolumeStore(synthetic_chest / "train.h5") as store:
        for name in list(scores.index)[:2]:
            vol = torch.from_numpy(store.read(name))[None, None]
            with torch.inference_mode():
                direct = zero_shot_scores(model.encode_volume(vol), prompts, float(model.temperature_scale()))
            np.testing.assert_allclose(scores.loc[name].to_numpy(), direct[0], atol=2e-6)

    table = pd.read_csv(out / "metrics_per_finding.csv").set_index("finding")
    assert list(table.index) == list(FINDINGS)
    for m in ("auroc", "auprc", "f1", "accuracy", "precision", "recall", "specificity"):
        assert {m, f"{m}_lower", f"{m}_upper"} <= set(table.columns)
    one_class = [f for f in FINDINGS if labels[f].nunique() < 2]
    assert ABSENT in one_class and sorted(table.index[table["undefined"].notna()]) == sorted(one_class)
    defined = [f for f in FINDINGS if f not in one_class]
    logits = pd.read_csv(out / "logits.csv").set_index("VolumeName")
    np.testing.assert_allclose(scores.to_numpy(), expit(logits.to_numpy()), rtol=1e-15)
    for f in defined:  # point AUROC = sklearn on the written logits (what the metrics rank by)
        assert abs(table.loc[f, "auroc"] - roc_auc_score(labels.loc[logits.index, f], logits[f])) < 1e-9
        assert table.loc[f, "auroc_lower"] <= table.loc[f, "auroc"] <= table.loc[f, "auroc_upper"]

    s = json.loads((out / "summary.json").read_text())
    assert s["protocol"] == "standard" and s["n_bootstrap"] == 200 and s["bootstrap_unit"] == "patient"
    assert s["macro"]["auroc"]["n_findings"] == len(defined) and sorted(s["excluded_findings"]) == sorted(one_class)
    assert math.isclose(s["macro"]["auroc"]["value"], float(np.mean(table.loc[defined, "auroc"])), abs_tol=1e-6)
    assert s["model"]["sha256"] == file_sha256(trained) and s["model"]["step"] == 30
    assert s["data"]["test_labels_sha256"] == file_sha256(standard_labels)
    assert len(s["data"]["volumes_sha256"]) == 64 and s["versions"]["torch"] == torch.__version__
    assert set(s["thresholds"]) == set(FINDINGS) and s["config"]["n_bootstrap"] == 200
    assert imread(out / "roc_curves.png").shape[0] > 300

    r = json.loads((out / "retrieval.json").read_text())
    for direction in ("volume_to_text", "text_to_volume"):
        assert 0 <= r[direction]["R@1"] <= r[direction]["R@5"] <= r[direction]["R@10"] <= 1
    assert r["volume_to_text"]["n_queries"] == len(labels)


def test_volumes_checksum_is_reproducible_and_data_dependent(synthetic_chest, trained, standard_run, tmp_path,
                                                            capsys):
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "again", "--n_bootstrap", "0")) == 0
    printed = capsys.readouterr().out
    assert "zero-shot macro AUROC" in printed and f"ROC figure: {tmp_path / 'again' / 'roc_curves.png'}" in printed
    a = json.loads((standard_run / "summary.json").read_text())["data"]["volumes_sha256"]
    b = json.loads((tmp_path / "again" / "summary.json").read_text())["data"]["volumes_sha256"]
    assert a == b
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "valid", "--n_bootstrap", "0",
                                labels="valid_predicted_labels.csv") + ["--test_data", str(synthetic_chest / "valid.h5")]) == 0
    c = json.loads((tmp_path / "valid" / "summary.json").read_text())["data"]["volumes_sha256"]
    assert c != a


def test_ctclip_protocol_and_threshold_options(synthetic_chest, trained, standard_run, tmp_path):
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "ref", "--metric_protocol", "ctclip")) == 0
    s = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s["protocol"] == "ctclip" and s["n_bootstrap"] == 0 and "NOT confidence intervals" in " ".join(s["notes"])
    grid = np.linspace(0, 1, 100)
    for f, t in s["thresholds"].items():
        if t is not None:
            assert np.min(np.abs(grid - t)) < 1e-12, f
        values, lower = s["findings"][f]["values"], s["findings"][f]["lower"]
        assert values == lower
    # thresholds carried over from a previous run's summary.json
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "file", "--n_bootstrap", "0", "--threshold",
                                f"file:{standard_run / 'summary.json'}")) == 0
    first = json.loads((standard_run / "summary.json").read_text())["thresholds"]
    again = json.loads((tmp_path / "file" / "summary.json").read_text())["thresholds"]
    # the file's thresholds are used where it has one (it has none for the finding absent from its labels)
    assert first[ABSENT] is None
    assert {f: v for f, v in first.items() if v is not None} == {f: again[f] for f, v in first.items() if v is not None}
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "fixed", "--n_bootstrap", "0",
                                "--threshold", "fixed:0.5")) == 0
    t = json.loads((tmp_path / "fixed" / "summary.json").read_text())["thresholds"]
    assert all(v == 0.5 for v in t.values() if v is not None)
    # the ctclip protocol refuses another threshold rule; nonsense specs are named
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "x", "--metric_protocol", "ctclip",
                                "--threshold", "youden")) == 2
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "x", "--threshold", "fixed:abc")) == 2


def test_scan_aggregation_matches_a_groupby(synthetic_chest, trained, standard_run, tmp_path):
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path, "--aggregate", "scan", "--n_bootstrap", "50")) == 0
    per_volume = pd.read_csv(standard_run / "scores.csv")
    expected = per_volume.assign(scan=per_volume["VolumeName"].map(scan_of)).groupby("scan")[list(FINDINGS)].max()
    per_scan = pd.read_csv(tmp_path / "scores_per_scan.csv").set_index("ScanName").sort_index()
    assert list(per_scan.index) == list(expected.index)
    np.testing.assert_allclose(per_scan.to_numpy(), expected.to_numpy(), atol=2e-6)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["unit"] == "scan" and s["n_units"] == len(expected)


def test_bad_inputs_are_named(synthetic_chest, trained, tmp_path, caplog):
    labels = pd.read_csv(synthetic_chest / "train_predicted_labels.csv")
    extra = labels.iloc[[0]].assign(VolumeName="train_999_a_1.nii.gz")
    with_missing = tmp_path / "missing.csv"
    pd.concat([labels, extra]).to_csv(with_missing, index=False)
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "a", "--test_labels", str(with_missing))) == 2
    assert "train_999_a_1.nii.gz" in caplog.text and "--allow_missing" in caplog.text
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "b", "--test_labels", str(with_missing),
                                "--allow_missing", "--n_bootstrap", "0")) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["data"]["missing_volumes"] == ["train_999_a_1.nii.gz"]

    caplog.clear()
    misspelled = tmp_path / "misspelled.csv"
    labels.rename(columns={"Cardiomegaly": "Cardiomegally"}).to_csv(misspelled, index=False)
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "c", "--test_labels", str(misspelled))) == 2
    assert "'Cardiomegaly'" in caplog.text and "Cardiomegally" in caplog.text

    caplog.clear()
    nan_labels = tmp_path / "nan.csv"
    partial = labels.copy()
    partial.loc[:4, "Consolidation"] = np.nan
    partial.to_csv(nan_labels, index=False)
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "d", "--test_labels", str(nan_labels),
                                "--n_bootstrap", "0")) == 0
    table = pd.read_csv(tmp_path / "d" / "metrics_per_finding.csv").set_index("finding")
    assert table.loc["Consolidation", "n"] == len(labels) - 5 and table.loc["Emphysema", "n"] == len(labels)

    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"not a checkpoint")
    assert eval_main(_eval_args(synthetic_chest, not_a_model, tmp_path / "e")) == 2
    assert "not a readable checkpoint" in caplog.text
    assert eval_main(_eval_args(synthetic_chest, trained, tmp_path / "f", "--templates", "nope")) == 2


def test_a_store_of_another_layout_is_refused(synthetic_chest, trained, radiological_valid, tmp_path, caplog):
    args = _eval_args(synthetic_chest, trained, tmp_path / "a", labels="valid_predicted_labels.csv")
    args[args.index("--test_data") + 1] = str(radiological_valid)
    assert eval_main(args) == 2
    assert "was trained on SPR" in caplog.text and "stores volumes as SPL" in caplog.text
    assert "Preprocess the volumes again with the default --layout seed" in caplog.text
    assert not (tmp_path / "a" / "summary.json").exists()
    caplog.clear()  # a checkpoint from before layouts were recorded: a warning, then the evaluation
    old = torch.load(trained, weights_only=True)
    del old["store_layout"]
    torch.save(old, tmp_path / "old.pt")
    args[args.index("--model_path") + 1] = str(tmp_path / "old.pt")
    args[args.index("--output_dir") + 1] = str(tmp_path / "b")
    assert eval_main(args + ["--n_bootstrap", "0"]) == 0
    assert "records no store layout" in caplog.text


def test_saturated_scores_are_ranked_by_their_margin():
    """With the learned scale at its cap a float32 softmax says 1.0 for most positives, and they tie. The
    margin ranks them; ties remain only where the embeddings are the same."""
    rng = np.random.default_rng(0)
    n, e = 400, 32
    prompts = torch.nn.functional.normalize(torch.randn(1, 2, e, dtype=torch.float64), dim=-1)
    y = rng.integers(0, 2, n)
    direction = (prompts[0, 0] - prompts[0, 1]).numpy()
    vols = rng.normal(size=(n, e)) + np.outer(np.where(y == 1, 1.0, -0.3) + rng.normal(0, 0.8, n), direction) * 3
    vols[1] = vols[0]  # one truly equal pair
    feats = torch.nn.functional.normalize(torch.from_numpy(vols), dim=-1).float()
    margins = zero_shot_margins(feats, prompts.float(), 100.0)[:, 0]
    old = (torch.einsum("ne,fke->nfk", feats, prompts.float()) * 100.0).softmax(-1)[..., 0].numpy()[:, 0]
    assert (old == 1.0).sum() > 20  # the float32 probabilities tie at 1.0 ...
    assert len(np.unique(margins)) == n - 1 and margins[0] == margins[1]  # ... the margins only where equal
    np.testing.assert_allclose(zero_shot_scores(feats, prompts.float(), 100.0)[:, 0], expit(margins), rtol=1e-15)
    result = evaluate_findings(y[:, None].astype(float), margins[:, None], ["x"], n_bootstrap=0, logits=True)
    assert result.findings[0].values["auroc"] == pytest.approx(roc_auc_score(y, margins), abs=1e-12)
    assert roc_auc_score(y, old) != pytest.approx(roc_auc_score(y, margins), abs=1e-4)  # the ties moved it


def test_seed_preset_is_the_seeds_softmax_over_unscaled_cosines(trained):
    model, _ = load_trained_model(trained)
    seed = load_templates("seed")
    assert seed.render("Lung nodule") == (["Lung nodule"], ["no Lung nodule"]) and seed.scale(57.0) == 1.0
    assert load_templates("ctclip").scale(57.0) == 57.0
    with torch.inference_mode():
        text = torch.nn.functional.normalize(model.encode_text(model.tokenize(["Emphysema", "no Emphysema"])), dim=-1)
        vol = torch.nn.functional.normalize(torch.randn(5, text.shape[1]), dim=-1)
    cos = (vol @ text.T).double().numpy()
    expected = np.exp(cos[:, 0]) / (np.exp(cos[:, 0]) + np.exp(cos[:, 1]))  # the seed's run_softmax_eval
    got = zero_shot_scores(vol, prompt_features(model, ["Emphysema"], seed), seed.scale(57.0))[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_templates_presets_and_files(tmp_path):
    t = load_templates("ctclip")
    assert t.render("Lung nodule") == (["Lung nodule is present."], ["Lung nodule is not present."])
    assert load_templates("ensemble").render("Emphysema")[1][1] == "There is no emphysema."
    f = tmp_path / "t.yaml"
    f.write_text("positive: ['Signs of {lower}.', '{} present.']\nnegative: 'No {lower}.'\n")
    assert load_templates(f).render("Emphysema") == (["Signs of emphysema.", "Emphysema present."], ["No emphysema."])
    txt = tmp_path / "t.txt"
    txt.write_text("{} seen.\n{} not seen.\n")
    assert load_templates(txt).positive == ("{} seen.",)
    txt.write_text("no placeholder\nnone\n")
    with pytest.raises(ValueError, match="positive template 'no placeholder' has no"):
        load_templates(txt)
    # a negative may be a shared normal reference: the same prompt for every finding
    f.write_text("positive: '{}.'\nnegative: ['No significant pathology.', 'Normal chest CT.']\n")
    ref = load_templates(f)
    assert ref.render("Emphysema") == (["Emphysema."], ["No significant pathology.", "Normal chest CT."])
    assert ref.render("Lung nodule")[1] == ref.render("Emphysema")[1]
    f.write_text("positive: '{}.'\nnegative: ['']\n")
    with pytest.raises(ValueError, match="not a non-empty string"):
        load_templates(f)
    f.write_text("positive: '{}'\nnegative: 'no {}'\nlogit_scale: 1\n")
    assert load_templates(f).logit_scale == 1.0
    f.write_text("positive: '{}'\nnegative: 'no {}'\nlogit_scale: -2\n")
    with pytest.raises(ValueError, match="logit_scale must be a positive number"):
        load_templates(f)


def test_prompt_ensemble_is_the_normalised_mean(trained):
    model, _ = load_trained_model(trained)
    feats = prompt_features(model, ["Emphysema"], load_templates("ensemble"))
    pos, neg = load_templates("ensemble").render("Emphysema")
    with torch.inference_mode():
        each = model.encode_text(model.tokenize(pos))
    expected = torch.nn.functional.normalize(each.mean(0), dim=-1)
    torch.testing.assert_close(feats[0, 0], expected)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(1, 2))


def test_aggregate_by_scan_takes_the_max_and_counts_disagreements():
    names = ["valid_1_a_1.nii.gz", "valid_1_a_2.nii.gz", "valid_1_b_1.nii.gz", "valid_2_a_1.nii.gz"]
    scores = np.array([[0.1, 0.9], [0.4, 0.2], [0.3, 0.3], [0.8, 0.1]])
    labels = np.array([[0, 1], [1, 1], [np.nan, 0], [np.nan, np.nan]], dtype=float)
    units, s, y, disagree = aggregate_by_scan(names, scores, labels)
    assert units == ["valid_1_a", "valid_1_b", "valid_2_a"]
    np.testing.assert_array_equal(s, [[0.4, 0.9], [0.3, 0.3], [0.8, 0.1]])
    np.testing.assert_array_equal(y[:2], [[1, 1], [np.nan, 0]])
    assert np.isnan(y[2]).all() and disagree == 1
    with pytest.raises(ValueError, match="CT-RATE volume name"):
        scan_of("scan.nii.gz")


def test_retrieval_recall_against_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    texts = ["a", "b", "a", "c", "d", "e", "b"]  # volumes 0/2 and 1/6 share a report
    gallery, of = text_gallery(texts)
    assert gallery == ["a", "b", "c", "d", "e"] and list(of) == [0, 1, 0, 2, 3, 4, 1]
    tf = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(5, 8))).float(), dim=-1)
    perfect = tf[of]
    r = recall_at_k(perfect, tf, of, ks=(1, 2))
    assert r["volume_to_text"]["R@1"] == 1.0 and r["text_to_volume"]["R@1"] == 1.0
    vf = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(7, 8))).float(), dim=-1)
    r = recall_at_k(vf, tf, of, ks=(1, 2, 3))
    sims = (vf @ tf.T).numpy()
    for k in (1, 2, 3):  # brute force: position of the true text in a descending sort
        hits = [of[i] in np.argsort(-sims[i], kind="stable")[:k] for i in range(7)]
        assert r["volume_to_text"][f"R@{k}"] == np.mean(hits)
        hits_t = [bool(set(np.flatnonzero(of == t)) & set(np.argsort(-sims[:, t], kind="stable")[:k])) for t in range(5)]
        assert r["text_to_volume"][f"R@{k}"] == np.mean(hits_t)
    same = recall_at_k(torch.ones(7, 8), torch.ones(5, 8), of, ks=(1,))  # all tied: counted against the model
    assert same["volume_to_text"]["R@1"] == 0.0 and same["volume_to_text"]["chance@1"] == 0.2

"""The vectorised metrics engine against a plain loop of sklearn calls on the same resamples.

The loop is the oracle (STYLE 12): every resample's AUROC, AUPRC, operating point and confusion
metrics must agree to 1e-12, and so must the percentile intervals. The CT-CLIP protocol is checked
against a literal re-statement of the reference code's threshold search and metric calls.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ctclip.metrics import (
    CTCLIP,
    METRICS,
    STANDARD,
    ThresholdRule,
    binary_metrics,
    evaluate_findings,
)
from ctcore.bootstrap import bootstrap_counts, counts_to_indices, percentile_ci

TOL = 1e-12


def _data(n=240, prevalence=0.3, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y)))
    if ties:
        s = np.round(s, 2)  # many tied scores, as softmax outputs of a small model have
    return y, s


def _sklearn_youden(y, s):
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return thr[np.argmax(tpr - fpr)]


def _sklearn_metrics(y, s, threshold, strict=False):
    pred = (s > threshold) if strict else (s >= threshold)
    pred = pred.astype(int)
    return {
        "auroc": roc_auc_score(y, s),
        "auprc": average_precision_score(y, s),
        "f1": f1_score(y, pred, zero_division=np.nan),
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=np.nan),
        "recall": recall_score(y, pred, zero_division=np.nan),
        "specificity": recall_score(y, pred, pos_label=0, zero_division=np.nan),
    }


def _reference_ctclip_threshold(p, y):
    """CT-CLIP's find_threshold, restated: grid of 100, `>`, `<=` keeps the last best."""
    best_t, best = 0, 10000
    for t in np.linspace(0, 1, 100):
        cm = confusion_matrix(y, (p > t).astype(int), labels=[0, 1])
        tp, tn, fp, fn = cm[1, 1], cm[0, 0], cm[0, 1], cm[1, 0]
        d = math.sqrt((1 - tp / (tp + fn)) ** 2 + (fp / (fp + tn)) ** 2)
        if d <= best:
            best, best_t = d, t
    return best_t


def _assert_close(a, b, what):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b)), what
    ok = ~np.isnan(a)
    assert np.max(np.abs(a[ok] - b[ok]), initial=0) <= TOL, f"{what}: max diff {np.max(np.abs(a[ok] - b[ok]))}"


def test_point_metrics_match_sklearn():
    y, s = _data()
    ours = binary_metrics(y, s)
    t = _sklearn_youden(y, s)
    assert ours["threshold"][0] == t
    for m, v in _sklearn_metrics(y, s, t).items():
        _assert_close(ours[m], [v], m)


@pytest.mark.parametrize("clustered", [False, True])
def test_bootstrap_youden_matches_sklearn_loop(clustered):
    y, s = _data(n=200, seed=1)
    clusters = np.repeat(np.arange(80), 3)[:200] if clustered else None
    counts = bootstrap_counts(len(y), 150, seed=7, clusters=clusters)
    if clustered:  # every member of a drawn cluster comes along: equal counts within a cluster
        assert all(len(set(counts[0, clusters == c])) == 1 for c in range(5))
    ours = binary_metrics(y, s, counts, ThresholdRule("youden"))
    loop = {m: [] for m in METRICS}
    for row in counts:
        idx = counts_to_indices(row)
        yb, sb = y[idx], s[idx]
        for m, v in _sklearn_metrics(yb, sb, _sklearn_youden(yb, sb)).items():
            loop[m].append(v)
    for m in METRICS:
        _assert_close(ours[m], loop[m], m)
        _assert_close(percentile_ci(ours[m]), np.percentile(loop[m], [2.5, 97.5]), f"CI {m}")


def test_ctclip_rule_resampled_and_fixed_threshold_match_loop():
    y, s = _data(n=150, seed=2, ties=False)
    counts = bootstrap_counts(len(y), 60, seed=3)
    ours = binary_metrics(y, s, counts, ThresholdRule("ctclip"))
    fixed = binary_metrics(y, s, counts, ThresholdRule("fixed", 0.5))
    for b, row in enumerate(counts):
        idx = counts_to_indices(row)
        yb, sb = y[idx], s[idx]
        t = _reference_ctclip_threshold(sb, yb)
        assert ours["threshold"][b] == t
        for m, v in _sklearn_metrics(yb, sb, t, strict=True).items():
            _assert_close(ours[m][b], v, f"ctclip rule {m}")
        for m, v in _sklearn_metrics(yb, sb, 0.5).items():
            _assert_close(fixed[m][b], v, f"fixed {m}")


@pytest.mark.parametrize("rule", [ThresholdRule("youden"), ThresholdRule("ctclip"), ThresholdRule("fixed", 0.4)])
def test_logit_scores_give_the_probability_scores_metrics(rule):
    """Zero-shot margins (logits) with thresholds given and reported as probabilities: the same numbers as
    the probabilities themselves wherever those do not saturate."""
    y, s = _data(n=180, seed=5, ties=False)
    counts = bootstrap_counts(len(y), 50, seed=1)
    on_p = binary_metrics(y, s, counts, rule)
    on_logit = binary_metrics(y, np.log(s / (1 - s)), counts, rule, logits=True)
    for m in METRICS:
        _assert_close(on_logit[m], on_p[m], m)
    np.testing.assert_allclose(on_logit["threshold"], on_p["threshold"], rtol=1e-12)  # expit(logit(p)) = p


def test_ctclip_protocol_reproduces_reference_numbers():
    rng = np.random.default_rng(4)
    labels = (rng.random((120, 3)) < [0.2, 0.4, 0.6]).astype(float)
    scores = np.clip(rng.random((120, 3)) * 0.6 + labels * 0.3, 0, 1)
    res = evaluate_findings(labels, scores, ["a", "b", "c"], rule=ThresholdRule("ctclip"), protocol=CTCLIP)
    assert res.n_bootstrap == 0 and "NOT confidence intervals" in res.notes[0]
    for j, f in enumerate(res.findings):
        y, p = labels[:, j], scores[:, j]
        t = _reference_ctclip_threshold(p, y)
        pred = (p > t).astype(int)
        fpr, tpr, _ = roc_curve(y, p)
        assert f.threshold == t
        assert abs(f.values["auroc"] - np.trapezoid(tpr, fpr)) < TOL
        assert abs(f.values["f1"] - f1_score(y, pred, average="weighted")) < TOL
        assert abs(f.values["accuracy"] - accuracy_score(y, pred)) < TOL
        assert abs(f.values["precision"] - precision_score(y, pred, zero_division=0)) < TOL
        assert f.lower == f.values == f.upper  # the reference's interval is the point repeated


def test_ctclip_precision_zero_division_is_zero():
    y = np.array([0, 0, 1, 1.0])
    s = np.array([0.1, 0.2, 0.3, 0.4])
    ours = binary_metrics(y, s, None, ThresholdRule("fixed", 0.9), CTCLIP)
    assert ours["precision"][0] == precision_score(y, s >= 0.9, zero_division=0) == 0.0
    assert math.isnan(binary_metrics(y, s, None, ThresholdRule("fixed", 0.9), STANDARD)["precision"][0])


def test_evaluate_findings_shared_resamples_give_the_macro_interval():
    rng = np.random.default_rng(5)
    labels = (rng.random((160, 4)) < 0.35).astype(float)
    scores = np.clip(rng.random((160, 4)) * 0.7 + labels * 0.25, 0, 1)
    labels[rng.random((160, 4)) < 0.1] = np.nan  # unknown labels: dropped for that finding only
    res = evaluate_findings(labels, scores, list("abcd"), n_bootstrap=120, seed=11)
    counts = bootstrap_counts(160, 120, seed=11)
    per_finding = []
    for j, f in enumerate(res.findings):
        keep = ~np.isnan(labels[:, j])
        assert f.n == keep.sum()
        loop = []
        for row in counts[:, keep]:
            idx = counts_to_indices(row)
            loop.append(roc_auc_score(labels[keep, j][idx], scores[keep, j][idx]))
        _assert_close(f.resamples["auroc"], loop, f"finding {f.name}")
        assert abs(f.values["auroc"] - roc_auc_score(labels[keep, j], scores[keep, j])) < TOL
        per_finding.append(loop)
    lo, hi = np.percentile(np.mean(per_finding, axis=0), [2.5, 97.5])
    m = res.macro["auroc"]
    assert abs(m["lower"] - lo) < TOL and abs(m["upper"] - hi) < TOL
    assert m["lower"] < m["value"] < m["upper"] and m["n_findings"] == 4


def test_one_class_finding_is_nan_with_a_reason_and_left_out_of_the_macro_mean():
    y, s = _data(n=100, seed=6)
    labels = np.stack([y, np.zeros_like(y), y], axis=1)
    labels[:50, 2] = np.nan
    labels[50:, 2] = 1.0  # after dropping NaN rows: all positive
    scores = np.stack([s, s, s], axis=1)
    res = evaluate_findings(labels, scores, ["ok", "negatives", "positives"], n_bootstrap=50)
    ok, neg, pos = res.findings
    assert neg.undefined and "negative" in neg.undefined and math.isnan(neg.values["auroc"])
    assert pos.undefined and "positive" in pos.undefined and pos.n == 50
    assert res.excluded == ["negatives", "positives"]
    assert res.macro["auroc"]["n_findings"] == 1 and res.macro["auroc"]["value"] == ok.values["auroc"]
    assert any("2 finding(s) left out" in n for n in res.notes)


def test_stratified_resamples_keep_both_classes_and_seed_reproduces():
    y, s = _data(n=40, prevalence=0.08, seed=8)  # ~3 positives: plain resamples often draw none
    strat = bootstrap_counts(len(y), 300, seed=1, strata=y)
    assert (strat[:, y == 1].sum(1) == (y == 1).sum()).all() and (strat.sum(1) == len(y)).all()
    plain = evaluate_findings(y[:, None], s[:, None], ["x"], n_bootstrap=300, seed=1)
    assert plain.findings[0].n_resamples_undefined > 0  # the notes say so
    assert any("one class only" in n for n in plain.notes)
    a = evaluate_findings(y[:, None], s[:, None], ["x"], n_bootstrap=300, seed=1, stratified=True)
    b = evaluate_findings(y[:, None], s[:, None], ["x"], n_bootstrap=300, seed=1, stratified=True)
    assert a.findings[0].n_resamples_undefined == 0
    assert a.findings[0].lower == b.findings[0].lower and a.findings[0].upper == b.findings[0].upper


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="must both be"):
        evaluate_findings(np.zeros((5, 2)), np.zeros((5, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_findings(np.zeros((3, 1)), np.array([[np.nan], [0.1], [0.2]]), ["a"])
    with pytest.raises(ValueError, match="fixed threshold"):
        ThresholdRule("fixed")
    with pytest.raises(ValueError, match="method"):
        ThresholdRule("otsu")

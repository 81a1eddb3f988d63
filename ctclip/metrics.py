"""Binary classification metrics with bootstrap confidence intervals, all resamples at once.

    from ctclip.metrics import evaluate_findings, ThresholdRule, STANDARD
    result = evaluate_findings(labels, scores, FINDINGS, rule=ThresholdRule("youden"), n_bootstrap=1000)
    result.macro["auroc"]  # {"value": ..., "lower": ..., "upper": ...}

How it is vectorised: a bootstrap resample is a row of counts (how often each sample was drawn), so
B resamples are a (B, N) count matrix (drawn by `ctcore.bootstrap.bootstrap_counts`: one generator
for all resamples, optionally by cluster or stratum). With the samples sorted by score once,
cumulative sums of the positive and negative counts along that order give, for every resample at
once, the true and false positives at every distinct score: the whole ROC and precision-recall curve of each resample. AUROC
(trapezoid, exactly sklearn's roc_auc_score), average precision (sklearn's average_precision_score),
the operating point and the confusion counts at it follow with array operations. The test oracle is
a plain loop of sklearn calls on the same resamples (tests/test_ctclip_metrics.py).

Two protocols (DESIGN 4.5):
- `standard`: percentile bootstrap CIs over resamples of the evaluation units (optionally clustered,
  e.g. by patient, or stratified by label); binary F1; an undefined ratio is NaN. A threshold chosen
  on the evaluated set (Youden, or the CT-CLIP rule) is chosen again on every resample, so its
  optimism is part of the interval.
- `ctclip`: the CT-CLIP reference code's numbers: threshold = the last point of linspace(0, 1, 100)
  closest to (0, 1) on the ROC with `score > t`, F1 averaged over both classes weighted by support,
  precision with 0 for 0/0, and no resampling (the reference's bootstrap lines are commented out, so
  its "confidence interval" is the point estimate repeated).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit

from ctcore.bootstrap import bootstrap_counts, percentile_ci

METRICS: tuple[str, ...] = ("auroc", "auprc", "f1", "accuracy", "precision", "recall", "specificity")
CTCLIP_GRID = np.linspace(0.0, 1.0, 100)  # the reference's candidate thresholds
THRESHOLD_METHODS = ("youden", "ctclip", "fixed")


@dataclass(frozen=True)
class ThresholdRule:
    """How a finding's operating point is set. `youden`: max TPR - FPR over the distinct scores,
    positive = score >= t. `ctclip`: the reference's grid rule, positive = score > t. `fixed`: a given
    `value`, positive = score >= value (a threshold carried over from a validation run)."""

    method: str = "youden"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.method not in THRESHOLD_METHODS:
            raise ValueError(f"threshold method must be one of {THRESHOLD_METHODS}, got {self.method!r}")
        if self.method == "fixed" and (self.value is None or not np.isfinite(self.value)):
            raise ValueError(f"a fixed threshold needs a finite value, got {self.value!r}")


@dataclass(frozen=True)
class Protocol:
    name: str
    f1_average: str  # "binary" | "weighted" (over both classes, by support)
    zero_division: float  # value of precision / F1 when their denominator is 0
    resample: bool


STANDARD = Protocol("standard", f1_average="binary", zero_division=float("nan"), resample=True)
CTCLIP = Protocol("ctclip", f1_average="weighted", zero_division=0.0, resample=False)
PROTOCOLS = {p.name: p for p in (STANDARD, CTCLIP)}


# ---- curves and metrics for many resamples at once ------------------------------------------------

@dataclass
class _Curves:
    """Cumulative positive / negative weight above each distinct score (descending), per resample."""

    distinct: np.ndarray  # (U,) distinct scores, descending
    tp: np.ndarray  # (B, U + 1): column g = weight of positives among the g highest distinct scores
    fp: np.ndarray  # (B, U + 1)

    @property
    def n_pos(self) -> np.ndarray:
        return self.tp[:, -1]

    @property
    def n_neg(self) -> np.ndarray:
        return self.fp[:, -1]


def _curves(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> _Curves:
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order].astype(bool)
    w = weights[:, order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    zero = np.zeros((len(w), 1))
    tp = np.concatenate([zero, np.cumsum(w * y_sorted, axis=1)[:, last_of_group]], axis=1)
    fp = np.concatenate([zero, np.cumsum(w * ~y_sorted, axis=1)[:, last_of_group]], axis=1)
    return _Curves(s_sorted[last_of_group], tp, fp)


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _auroc(c: _Curves) -> np.ndarray:
    """Trapezoid area under (FPR, TPR) through every distinct score, as sklearn; NaN for one class."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = c.tp / c.n_pos[:, None], c.fp / c.n_neg[:, None]
    area = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    return np.where((c.n_pos > 0) & (c.n_neg > 0), area, np.nan)


def _auprc(c: _Curves) -> np.ndarray:
    """Average precision: sum over distinct scores of (recall step) x (precision there), as sklearn."""
    tp, fp = c.tp[:, 1:], c.fp[:, 1:]
    precision = _divide(tp, tp + fp, 0.0)  # 0/0 only where no weight yet, where the recall step is 0 too
    ap = _divide(np.sum(np.diff(c.tp, axis=1) * precision, axis=1), c.n_pos, np.nan)
    return np.where(c.n_pos > 0, ap, np.nan)


def _operating_point(c: _Curves, rule: ThresholdRule, logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(B,) column of the curves (how many distinct scores count as positive) and (B,) threshold.

    With `logits` the scores are logits of probabilities (compared as such, without the ties rounding
    to 1.0 makes); thresholds are still given and reported as probabilities."""
    b = len(c.tp)
    to_score = logit if logits else (lambda t: t)
    if rule.method == "fixed":
        g = int(np.sum(c.distinct >= to_score(rule.value)))
        return np.full(b, g), np.full(b, float(rule.value))
    with np.errstate(invalid="ignore", divide="ignore"):
        if rule.method == "youden":
            j = c.tp / c.n_pos[:, None] - c.fp / c.n_neg[:, None]
            g = np.argmax(np.nan_to_num(j, nan=-np.inf), axis=1)  # first max: the highest threshold
            thresholds = np.r_[np.inf, c.distinct][g]
            return g, (expit(thresholds) if logits else thresholds)
        # ctclip: positive = score > t on the grid; the LAST t with the smallest distance to (0, 1)
        cols = np.sum(c.distinct[None, :] > to_score(CTCLIP_GRID)[:, None], axis=1)  # (T,)
        tpr = c.tp[:, cols] / c.n_pos[:, None]
        fpr = c.fp[:, cols] / c.n_neg[:, None]
        dist = np.sqrt((1 - tpr) ** 2 + fpr ** 2)
    dist = np.nan_to_num(dist, nan=np.inf)
    pick = len(CTCLIP_GRID) - 1 - np.argmin(dist[:, ::-1], axis=1)
    pick = np.where(np.isinf(dist).all(axis=1), 0, pick)  # one class: the reference keeps its start, 0
    return cols[pick], CTCLIP_GRID[pick]


def binary_metrics(y: np.ndarray, s: np.ndarray, weights: np.ndarray | None = None,
                   rule: ThresholdRule = ThresholdRule(), protocol: Protocol = STANDARD,
                   logits: bool = False) -> dict[str, np.ndarray]:
    """Every metric of METRICS plus "threshold", one value per row of `weights` ((B, N) sample counts;
    None = the sample itself, B = 1). `y` in {0, 1}, no NaN (drop those rows first). `logits`: `s` are
    logits of probabilities (see `_operating_point`)."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if weights is None:
        weights = np.ones((1, len(y)))
    c = _curves(y, s, weights)
    g, threshold = _operating_point(c, rule, logits)
    rows = np.arange(len(g))
    tp, fp = c.tp[rows, g], c.fp[rows, g]
    pos, neg = c.n_pos, c.n_neg
    fn, tn = pos - tp, neg - fp
    zd = protocol.zero_division
    f1 = _divide(2 * tp, 2 * tp + fp + fn, zd)
    if protocol.f1_average == "weighted":
        f1_neg = _divide(2 * tn, 2 * tn + fn + fp, zd)
        f1 = _divide(f1 * pos + f1_neg * neg, pos + neg, zd)
    return {
        "auroc": _auroc(c),
        "auprc": _auprc(c),
        "f1": f1,
        "accuracy": _divide(tp + tn, pos + neg, np.nan),
        "precision": _divide(tp, tp + fp, zd),
        "recall": _divide(tp, pos, np.nan),
        "specificity": _divide(tn, neg, np.nan),
        "threshold": threshold,
    }


# ---- findings and macro means ---------------------------------------------------------------------

@dataclass
class FindingResult:
    name: str
    n: int
    n_positive: int
    threshold: float
    values: dict[str, float]
    lower: dict[str, float]
    upper: dict[str, float]
    undefined: str | None = None  # why the finding has no metrics (one class only, no labels)
    n_resamples_undefined: int = 0  # resamples where AUROC is undefined (one class drawn)
    resamples: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def prevalence(self) -> float:
        return self.n_positive / self.n if self.n else float("nan")


@dataclass
class EvaluationResult:
    protocol: str
    findings: list[FindingResult]
    macro: dict[str, dict[str, float]]
    n_bootstrap: int
    ci: float
    notes: list[str]

    @property
    def excluded(self) -> list[str]:
        return [f.name for f in self.findings if f.undefined]


def _undefined(name: str, n: int, n_pos: int, reason: str) -> FindingResult:
    nan = {m: float("nan") for m in METRICS}
    return FindingResult(name, n, n_pos, float("nan"), dict(nan), dict(nan), dict(nan), undefined=reason)


def evaluate_finding(name: str, y: np.ndarray, s: np.ndarray, rule: ThresholdRule, protocol: Protocol,
                     counts: np.ndarray | None, ci: float, logits: bool = False) -> FindingResult:
    """Point metrics of one finding, and percentile CIs when `counts` ((B, N) resamples) is given.
    Rows whose label is NaN must already be removed (the caller drops them and their counts)."""
    n, n_pos = len(y), int(np.sum(y == 1))
    if n == 0:
        return _undefined(name, 0, 0, "no labelled samples")
    if n_pos in (0, n):
        which = "positive" if n_pos == n else "negative"
        return _undefined(name, n, n_pos, f"all {n} labels are {which}: AUROC is undefined")
    point = binary_metrics(y, s, None, rule, protocol, logits)
    values = {m: float(point[m][0]) for m in METRICS}
    if counts is None or not protocol.resample:
        return FindingResult(name, n, n_pos, float(point["threshold"][0]), values, dict(values), dict(values))
    boot = binary_metrics(y, s, counts, rule, protocol, logits)
    bounds = {m: percentile_ci(boot[m], ci) for m in METRICS}
    return FindingResult(name, n, n_pos, float(point["threshold"][0]), values,
                         {m: b[0] for m, b in bounds.items()}, {m: b[1] for m, b in bounds.items()},
                         n_resamples_undefined=int(np.isnan(boot["auroc"]).sum()),
                         resamples={m: boot[m] for m in METRICS})


def evaluate_findings(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str], *,
                      rule: ThresholdRule | Mapping[str, ThresholdRule] = ThresholdRule(),
                      protocol: Protocol = STANDARD, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
                      clusters: np.ndarray | None = None, stratified: bool = False,
                      logits: bool = False) -> EvaluationResult:
    """Per-finding metrics with CIs, and macro means with CIs over the findings that are defined.

    labels (N, F) in {0, 1, NaN} and scores (N, F). Resamples are drawn once over the N units (or
    their `clusters`) and shared by all findings, so the macro mean's interval keeps the correlation
    between findings; a finding's NaN-labelled rows are dropped from its share of every resample.
    `stratified` resamples each finding's positives and negatives separately instead (seeded per
    finding); the macro interval then treats findings as independent. `logits`: the scores are logits of
    the probabilities (zero-shot margins): ranked without the probabilities' float ties, thresholds given
    and reported as probabilities."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 2 or labels.shape[1] != len(findings):
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be (N, {len(findings)})")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rules = rule if isinstance(rule, Mapping) else dict.fromkeys(findings, rule)
    resample = protocol.resample and n_bootstrap > 0
    if stratified and clusters is not None:
        raise ValueError("stratified resampling cannot be combined with clustered resampling")
    shared = (bootstrap_counts(len(labels), n_bootstrap, seed, clusters=clusters)
              if resample and not stratified else None)
    results = []
    for j, name in enumerate(findings):
        keep = ~np.isnan(labels[:, j])
        y, s = labels[keep, j], scores[keep, j]
        if not resample:
            counts = None
        elif stratified:
            counts = bootstrap_counts(len(y), n_bootstrap, seed + 1000 * (j + 1), strata=y)
        else:
            counts = shared[:, keep]
        results.append(evaluate_finding(name, y, s, rules[name], protocol, counts, ci, logits))
    notes = _notes(protocol, resample, stratified, clusters is not None, results)
    return EvaluationResult(protocol.name, results, _macro(results, resample, ci), n_bootstrap if resample else 0,
                            ci, notes)


def _macro(results: list[FindingResult], resampled: bool, ci: float) -> dict[str, dict[str, float]]:
    defined = [r for r in results if not r.undefined]
    out = {}
    for m in METRICS:
        value = float(np.nanmean([r.values[m] for r in defined])) if defined else float("nan")
        if resampled and defined:
            stacked = np.stack([r.resamples[m] for r in defined])
            with warnings.catch_warnings():  # a resample where every finding is undefined: NaN, skipped
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = percentile_ci(np.nanmean(stacked, axis=0), ci)
        else:
            lo = hi = value
        out[m] = {"value": value, "lower": lo, "upper": hi, "n_findings": len(defined)}
    return out


def _notes(protocol: Protocol, resampled: bool, stratified: bool, clustered: bool,
           results: list[FindingResult]) -> list[str]:
    notes = []
    if protocol.name == "ctclip":
        notes.append("ctclip protocol: reproduces the CT-CLIP reference code (threshold = last point of "
                     "linspace(0,1,100) closest to (0,1) with score > t, chosen on the scored set; F1 weighted "
                     "over both classes; precision 0 for 0/0). No resampling, as in the reference (its bootstrap "
                     "lines are commented out): CI bounds equal the point estimate and are NOT confidence intervals.")
    elif resampled:
        unit = "clusters (e.g. patients)" if clustered else "evaluation units"
        notes.append(f"percentile bootstrap over {unit}" + ("; stratified by label per finding, macro CI "
                                                           "assumes independent findings" if stratified else ""))
    excluded = [f"{r.name} ({r.undefined})" for r in results if r.undefined]
    if excluded:
        notes.append(f"{len(excluded)} finding(s) left out of the macro means: " + "; ".join(excluded))
    partial = [f"{r.name}: {r.n_resamples_undefined}" for r in results if r.n_resamples_undefined]
    if partial:
        notes.append("resamples with one class only (AUROC undefined, left out of that CI): " + ", ".join(partial))
    return notes

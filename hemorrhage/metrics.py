"""RSNA 2019 hemorrhage metrics: the competition's weighted log loss, a constant prior baseline, per-class
AUROC, and percentile bootstrap intervals for all of them from one set of resamples.

    from hemorrhage.metrics import weighted_log_loss, bootstrap_metrics, auroc_with_ci
    weighted_log_loss(y_true, y_prob)                        # (N, 6) arrays in CLASSES order
    res = bootstrap_metrics(y_true, y_prob, groups=study_uid_per_slice, n_bootstrap=1000)
    res["weighted_log_loss"]              # {"value", "lower", "upper"}
    res["per_class"]["subdural"]          # {"auroc", "lower", "upper", "n", "n_pos", "log_loss", ...}

Resampling unit: with `groups` (e.g. the StudyInstanceUID of every slice) whole groups are drawn with
replacement and all their slices come along (a cluster bootstrap: slices of one study are strongly
correlated, so resampling slices gives intervals that are too narrow); without, slices are drawn.
Resample r draws from its own generator ``default_rng((seed, r))``
(`ctcore.bootstrap.bootstrap_counts_per_resample`), so it is the same whatever n_bootstrap and
however the work is split into blocks.

Vectorisation: a block of b resamples is a (b, n_groups) count matrix (b ~ 32k / N, so the arrays stay
in cache); indexing it with each slice's group gives per-slice weights (N, b). Per class the slices are
sorted by score once; cumulative sums of the weights of positives and of all slices, read at the last
slice of every distinct score, are the weighted true / false positive counts at every threshold of every
resample of the block at once, and the trapezoid
over those points is sklearn's ``roc_auc_score(..., sample_weight=w)`` (ties included: a run of equal
scores is one step of the curve). Counts are integers, so the area's numerator is exact. The log loss
of a resample is (counts @ per-group loss sums) / (counts @ group sizes): a matrix product.
The test oracle is a plain loop of sklearn calls on the same weights (tests/test_hemorrhage_metrics.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctcore.bootstrap import bootstrap_counts_per_resample, group_codes, percentile_ci
from hemorrhage.classes import CLASS_WEIGHTS, CLASSES

EPS = 1e-7
BLOCK_ELEMENTS = 1 << 15  # per-slice weights per block (N x b): cache-sized was fastest (N = 300 .. 100k)


# ---- the competition metric ----------------------------------------------------------------------

def _as_pair(y_true, y_prob, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape or y.shape[1] != n_classes:
        raise ValueError(f"y_true {y.shape} and y_prob {p.shape} must both be (N, {n_classes})")
    if len(y) == 0:
        raise ValueError("no slices to evaluate")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 0 or 1 only")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite")
    return y, p


def _elementwise_log_loss(y: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return -np.where(y == 1.0, np.log(p), np.log(1.0 - p))


def per_class_log_loss(y_true, y_prob, eps: float = EPS) -> np.ndarray:
    """(C,) mean binary log loss over the N slices of each class, probabilities clipped to [eps, 1-eps]."""
    y, p = _as_pair(y_true, y_prob, np.shape(y_true)[-1])
    return _elementwise_log_loss(y, p, eps).mean(axis=0)


def weighted_log_loss(y_true, y_prob, weights: Sequence[float] = CLASS_WEIGHTS, eps: float = EPS) -> float:
    """The RSNA 2019 metric: ``sum_c w_c L_c / sum_c w_c`` with L_c the class's mean binary log loss.

    Every class has the same N slices, so this equals sklearn's ``log_loss`` on the flattened (N*C)
    labels with ``sample_weight`` = each entry's class weight (the tests check it to 1e-9)."""
    w = np.asarray(weights, dtype=np.float64)
    _as_pair(y_true, y_prob, len(w))
    return float(per_class_log_loss(y_true, y_prob, eps) @ w / w.sum())


def prior_baseline(y_train) -> np.ndarray:
    """(C,) training prevalence of each class: the constant predictor every model should beat."""
    y = np.asarray(y_train, dtype=np.float64)
    if y.ndim != 2 or len(y) == 0:
        raise ValueError(f"y_train must be a non-empty (N, C) array, got shape {y.shape}")
    return y.mean(axis=0)


def baseline_log_loss(prior, y_true, weights: Sequence[float] = CLASS_WEIGHTS, eps: float = EPS) -> float:
    """Weighted log loss on `y_true` of the constant prediction `prior` (from `prior_baseline`)."""
    y = np.asarray(y_true, dtype=np.float64)
    return weighted_log_loss(y, np.broadcast_to(np.asarray(prior, dtype=np.float64), y.shape), weights, eps)


# ---- resampling (the draws come from ctcore.bootstrap) --------------------------------------------

def _sort_class(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-p, kind="stable")
    last_of_run = np.r_[np.flatnonzero(np.diff(p[order]) != 0), len(p) - 1]
    return order, y[order] == 1.0, last_of_run


def _auroc_sorted(pos: np.ndarray, last_of_run: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(B,) AUROC from weights `w` (N, B) with slices in descending score order; NaN where a resample
    gives no weight to one class. Slices along axis 0: the cumulative sums run over contiguous rows."""
    tp = np.cumsum(w * pos[:, None], axis=0)[last_of_run]
    fp = np.cumsum(w, axis=0)[last_of_run] - tp
    tp_sum = tp.copy()  # tp at this threshold + tp at the one before (the trapezoid's two heights)
    tp_sum[1:] += tp[:-1]
    twice_area = np.einsum("ub,ub->b", np.diff(fp, axis=0, prepend=0), tp_sum)
    den = 2.0 * tp[-1] * fp[-1]
    out = np.full(w.shape[1], np.nan)
    np.divide(twice_area, den, out=out, where=den > 0)
    return out


def resample_auroc(y, p, weights) -> np.ndarray:
    """(B,) weighted AUROC of scores `p` for binary `y` under each row of `weights` (B, N); NaN where
    a row gives no weight to one class. Integer weights (bootstrap counts) are summed exactly."""
    y, p, w = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64), np.atleast_2d(weights)
    if w.dtype.kind not in "iu":
        w = w.astype(np.float64)
    order, pos, last = _sort_class(y, p)
    return _auroc_sorted(pos, last, w.T[order])


def _undefined_reason(y: np.ndarray) -> str | None:
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        return f"only one label value ({'all 1' if n_pos else 'all 0'}): AUROC undefined"
    return None


def bootstrap_metrics(y_true, y_prob, groups=None, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
                      weights: Sequence[float] = CLASS_WEIGHTS, eps: float = EPS,
                      names: Sequence[str] = CLASSES) -> dict:
    """Point estimates and percentile CIs of the weighted log loss, mean AUROC and per-class AUROC /
    log loss, all from the same resamples (see the module docstring). Undefined resamples (one label
    value drawn only) are left out of a class's AUROC interval and counted in `n_resamples_undefined`."""
    w_cls = np.asarray(weights, dtype=np.float64)
    y, p = _as_pair(y_true, y_prob, len(w_cls))
    if n_bootstrap < 0 or not 0.0 < ci < 1.0:
        raise ValueError(f"need n_bootstrap >= 0 and 0 < ci < 1, got {n_bootstrap}, {ci}")
    n, n_cls = y.shape
    codes = group_codes(groups, n)
    n_groups = int(codes.max()) + 1
    ll = _elementwise_log_loss(y, p, eps)
    group_ll = np.stack([np.bincount(codes, ll[:, c], minlength=n_groups) for c in range(n_cls)], axis=1)
    group_size = np.bincount(codes, minlength=n_groups).astype(np.float64)
    sorted_cls = [_sort_class(y[:, c], p[:, c]) for c in range(n_cls)]
    sorted_codes = [codes[order] for order, _, _ in sorted_cls]
    auroc = np.empty((n_bootstrap, n_cls))
    class_ll = np.empty((n_bootstrap, n_cls))
    block = max(1, BLOCK_ELEMENTS // n)
    for start in range(0, n_bootstrap, block):
        stop = min(start + block, n_bootstrap)
        counts = bootstrap_counts_per_resample(n_groups, start, stop, seed)
        class_ll[start:stop] = (counts @ group_ll) / (counts @ group_size)[:, None]
        counts_t = np.ascontiguousarray(counts.T)  # (G, b): gathering slices copies whole rows
        for c, (_, pos, last) in enumerate(sorted_cls):
            auroc[start:stop, c] = _auroc_sorted(pos, last, counts_t[sorted_codes[c]])
    point_auroc = np.array([resample_auroc(y[:, c], p[:, c], np.ones((1, n), np.int64))[0] for c in range(n_cls)])
    point_ll = ll.mean(axis=0)
    defined = ~np.isnan(point_auroc)
    per_class = {}
    for c, name in enumerate(names):
        lo, hi = percentile_ci(auroc[:, c], ci)
        ll_lo, ll_hi = percentile_ci(class_ll[:, c], ci)
        per_class[name] = {
            "auroc": float(point_auroc[c]), "lower": lo, "upper": hi, "n": n, "n_pos": int(y[:, c].sum()),
            "log_loss": float(point_ll[c]), "log_loss_lower": ll_lo, "log_loss_upper": ll_hi,
            "weight": float(w_cls[c]), "n_resamples_undefined": int(np.isnan(auroc[:, c]).sum()),
            "reason": _undefined_reason(y[:, c])}
    mean_auroc = auroc[:, defined].mean(axis=1) if defined.any() else np.full(n_bootstrap, np.nan)
    wll = class_ll @ w_cls / w_cls.sum()
    return {
        "weighted_log_loss": dict(zip(("value", "lower", "upper"),
                                      (float(point_ll @ w_cls / w_cls.sum()), *percentile_ci(wll, ci)))),
        "mean_auroc": {"value": float(point_auroc[defined].mean()) if defined.any() else float("nan"),
                       **dict(zip(("lower", "upper"), percentile_ci(mean_auroc, ci))),
                       "n_classes": int(defined.sum()),
                       "n_resamples_undefined": int(np.isnan(mean_auroc).sum())},
        "per_class": per_class,
        "n_bootstrap": n_bootstrap, "ci": ci, "seed": seed, "n_slices": n, "n_units": n_groups,
        "unit": "slice" if groups is None else "group",
    }


def auroc_with_ci(y_true, y_prob, groups=None, n_bootstrap: int = 1000, ci: float = 0.95,
                  seed: int = 0) -> dict[str, dict]:
    """Per class {auroc, lower, upper, n, n_pos, ...; reason when undefined} (see `bootstrap_metrics`)."""
    return bootstrap_metrics(y_true, y_prob, groups, n_bootstrap, ci, seed)["per_class"]

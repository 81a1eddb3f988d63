"""Bootstrap resampling: the one place that draws resamples, as count matrices.

    from ctcore.bootstrap import bootstrap_counts, bootstrap_counts_per_resample, percentile_ci
    counts = bootstrap_counts(n, 1000, seed=0, clusters=patient_of_volume)  # (1000, n), one generator
    block = bootstrap_counts_per_resample(n_studies, 200, 300, seed=0)     # resamples 200..299
    lower, upper = percentile_ci(metric_per_resample, ci=0.95)

A resample is a row of counts: how often each of the n units is drawn (with replacement, n draws, so a
row sums to n). B resamples are a (B, n) int64 matrix, which the metrics engines turn into every
resample's metric at once (`ctclip.metrics`, `hemorrhage.metrics`); `counts_to_indices` turns a row
back into indices for plain-loop references.

Two random streams, both kept because each module's published numbers depend on its own:
- `bootstrap_counts` (ctclip.metrics): one generator ``default_rng(seed)`` draws all B resamples at
  once, ``integers(0, n, size=(B, n))``. Resample r depends on B (and, stratified, on every stratum).
- `bootstrap_counts_per_resample` (hemorrhage.metrics): resample r draws from its own generator
  ``default_rng((seed, r))``, so resamples [start, stop) are the same whatever the total and however
  the work is split into blocks.

Units, the same for both streams: `clusters` (n,) labels draw whole clusters (as many draws as there
are clusters; every member of a drawn cluster comes along: one count per cluster, repeated over its
members); `strata` (n,) labels resample each stratum to its own size (so a finding's positives and
negatives both appear in every resample), strata in sorted order, each from the same generator(s) in
turn. Not both at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# draw(k) -> (b, k) counts of k units for the stream's b resamples, advancing the stream's generator(s)
Draw = Callable[[int], np.ndarray]


def bootstrap_counts(n: int, n_bootstrap: int, seed: int, *, clusters: np.ndarray | None = None,
                     strata: np.ndarray | None = None) -> np.ndarray:
    """(n_bootstrap, n) int64: how often each of n units is drawn in each resample, all resamples from one
    generator ``default_rng(seed)`` (see the module docstring for `clusters` and `strata`)."""
    if n == 0:
        return np.zeros((n_bootstrap, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)

    def draw(k: int) -> np.ndarray:
        idx = rng.integers(0, k, size=(n_bootstrap, k))
        flat = (idx + np.arange(n_bootstrap)[:, None] * k).ravel()  # row r's draws in bins r*k .. r*k+k-1
        return np.bincount(flat, minlength=n_bootstrap * k).reshape(n_bootstrap, k)

    return _resample(n, n_bootstrap, draw, clusters, strata)


def bootstrap_counts_per_resample(n: int, start: int, stop: int, seed: int, *,
                                  clusters: np.ndarray | None = None,
                                  strata: np.ndarray | None = None) -> np.ndarray:
    """(stop - start, n) int64: resamples start..stop-1, resample r drawn from its own generator
    ``default_rng((seed, r))``: any block of resamples is reproducible on its own."""
    if n == 0:
        return np.zeros((stop - start, 0), dtype=np.int64)
    rngs = [np.random.default_rng((seed, r)) for r in range(start, stop)]

    def draw(k: int) -> np.ndarray:
        out = np.empty((len(rngs), k), dtype=np.int64)
        for i, rng in enumerate(rngs):  # one cheap draw per resample: its own reproducible stream
            out[i] = np.bincount(rng.integers(0, k, k), minlength=k)
        return out

    return _resample(n, stop - start, draw, clusters, strata)


def _resample(n: int, n_resamples: int, draw: Draw, clusters: np.ndarray | None,
              strata: np.ndarray | None) -> np.ndarray:
    """The units of both streams: plain, whole clusters, or each stratum to its own size."""
    if clusters is not None and strata is not None:
        raise ValueError("bootstrap: clustered and stratified resampling cannot be combined")
    if strata is not None:
        strata = _per_unit(strata, n, "strata")
        counts = np.zeros((n_resamples, n), dtype=np.int64)
        for value in np.unique(strata):  # a loop over strata (e.g. two classes), not units
            members = np.flatnonzero(strata == value)
            counts[:, members] = draw(len(members))
        return counts
    if clusters is not None:
        codes = group_codes(clusters, n)
        return draw(int(codes.max()) + 1)[:, codes]
    return draw(n)


def group_codes(groups, n: int) -> np.ndarray:
    """(n,) cluster index 0..G-1 of every unit (clusters in sorted label order); each unit its own
    cluster if `groups` is None."""
    if groups is None:
        return np.arange(n)
    return np.unique(_per_unit(groups, n, "groups"), return_inverse=True)[1].ravel()


def _per_unit(labels, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{what} must have one entry per resampled unit ({n}), got shape {labels.shape}")
    return labels


def counts_to_indices(counts: np.ndarray) -> np.ndarray:
    """One resample's unit indices from its count row (for plain-loop references)."""
    return np.repeat(np.arange(len(counts)), np.asarray(counts).astype(np.int64))


def percentile_ci(values, ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval over the defined (non-NaN) resamples: the 50 (1 - ci) and 50 (1 + ci)
    percentiles (numpy's linear interpolation); (NaN, NaN) when no resample is defined.

    Both metrics modules had their own copy: ctclip wrote the ranks as 100 alpha / 2 and
    100 (1 - alpha / 2) with alpha = 1 - ci, over np.nanpercentile. For every ci >= 0.5 those are the
    same floats as these (1 - ci is exact there, and halving commutes with rounding), and dropping the
    NaN first gives nanpercentile's result, so neither module's intervals moved."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi)

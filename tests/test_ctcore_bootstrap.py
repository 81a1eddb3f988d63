"""ctcore.bootstrap: the count matrices of both random streams against a plain-loop oracle, and the
contract the metrics engines rely on (row sums, whole clusters, stratum sizes, reproducible slices)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctcore.bootstrap import (
    bootstrap_counts,
    bootstrap_counts_per_resample,
    counts_to_indices,
    group_codes,
    percentile_ci,
)

N = 30
CLUSTERS = np.array([f"patient{i}" for i in np.random.default_rng(0).integers(0, 11, N)])
STRATA = (np.random.default_rng(1).random(N) < 0.3).astype(float)


def one_generator_draws(seed, n_resamples):
    """The single stream as documented: one default_rng(seed), (B, k) indices per set of k units."""
    rng = np.random.default_rng(seed)
    return lambda k: rng.integers(0, k, size=(n_resamples, k))


def per_resample_draws(seed, start, stop):
    """The per-resample stream as documented: resample r draws k indices from default_rng((seed, r))."""
    rngs = [np.random.default_rng((seed, r)) for r in range(start, stop)]
    return lambda k: [rng.integers(0, k, k) for rng in rngs]


def oracle(n, n_resamples, draw, clusters=None, strata=None):
    """Counts by a loop over every drawn index: units, whole clusters (sorted labels), or each
    stratum (sorted values) drawn to its own size, one after the other."""
    counts = np.zeros((n_resamples, n), dtype=np.int64)
    if strata is not None:
        for value in sorted(set(strata.tolist())):
            members = [i for i in range(n) if strata[i] == value]
            for r, drawn in enumerate(draw(len(members))):
                for j in drawn:
                    counts[r, members[j]] += 1
    elif clusters is not None:
        labels = sorted(set(clusters.tolist()))
        for r, drawn in enumerate(draw(len(labels))):
            for j in drawn:
                for i in range(n):
                    counts[r, i] += clusters[i] == labels[j]
    else:
        for r, drawn in enumerate(draw(n)):
            for j in drawn:
                counts[r, j] += 1
    return counts


UNITS = {"units": {}, "clusters": {"clusters": CLUSTERS}, "strata": {"strata": STRATA}}


@pytest.mark.parametrize("units", list(UNITS))
@pytest.mark.parametrize("seed", [0, 7])
def test_both_streams_equal_the_oracle(units, seed):
    kw = UNITS[units]
    ours = bootstrap_counts(N, 40, seed, **kw)
    assert ours.dtype == np.int64 and ours.shape == (40, N)
    assert (ours == oracle(N, 40, one_generator_draws(seed, 40), **kw)).all()
    ours = bootstrap_counts_per_resample(N, 5, 45, seed, **kw)
    assert ours.dtype == np.int64 and ours.shape == (40, N)
    assert (ours == oracle(N, 40, per_resample_draws(seed, 5, 45), **kw)).all()


@pytest.mark.parametrize("draw", [lambda **kw: bootstrap_counts(N, 200, 3, **kw),
                                  lambda **kw: bootstrap_counts_per_resample(N, 0, 200, 3, **kw)])
def test_contract_row_sums_whole_clusters_and_stratum_sizes(draw):
    plain = draw()
    assert (plain.sum(axis=1) == N).all() and len(np.unique(plain, axis=0)) == 200

    clustered = draw(clusters=CLUSTERS)
    labels = np.unique(CLUSTERS)
    for c in labels:
        members = clustered[:, CLUSTERS == c]
        assert (members == members[:, :1]).all(), "a drawn cluster comes with all its members"
    first_member = np.array([np.flatnonzero(CLUSTERS == c)[0] for c in labels])
    assert (clustered[:, first_member].sum(axis=1) == len(labels)).all(), "as many draws as clusters"

    stratified = draw(strata=STRATA)
    for value in np.unique(STRATA):
        assert (stratified[:, STRATA == value].sum(axis=1) == (STRATA == value).sum()).all()


@pytest.mark.parametrize("units", list(UNITS))
def test_per_resample_stream_slices_are_reproducible(units):
    kw = UNITS[units]
    full = bootstrap_counts_per_resample(N, 0, 100, seed=5, **kw)
    assert (bootstrap_counts_per_resample(N, 40, 60, seed=5, **kw) == full[40:60]).all()
    assert (bootstrap_counts_per_resample(N, 99, 100, seed=5, **kw) == full[99:]).all()
    blocks = [bootstrap_counts_per_resample(N, a, min(a + 7, 100), seed=5, **kw) for a in range(0, 100, 7)]
    assert (np.concatenate(blocks) == full).all()
    assert bootstrap_counts_per_resample(N, 10, 10, seed=5, **kw).shape == (0, N)
    assert not (bootstrap_counts_per_resample(N, 0, 100, seed=6, **kw) == full).all()


def test_one_generator_stream_is_seeded():
    a = bootstrap_counts(N, 50, seed=2, clusters=CLUSTERS)
    assert (bootstrap_counts(N, 50, seed=2, clusters=CLUSTERS) == a).all()
    assert not (bootstrap_counts(N, 50, seed=3, clusters=CLUSTERS) == a).all()


def test_empty_and_refused_inputs():
    assert bootstrap_counts(0, 5, 0).shape == (5, 0)
    assert bootstrap_counts_per_resample(0, 2, 5, 0).shape == (3, 0)
    for draw in (lambda **kw: bootstrap_counts(N, 5, 0, **kw),
                 lambda **kw: bootstrap_counts_per_resample(N, 0, 5, 0, **kw)):
        with pytest.raises(ValueError, match="cannot be combined"):
            draw(clusters=CLUSTERS, strata=STRATA)
        with pytest.raises(ValueError, match="one entry per resampled unit"):
            draw(clusters=CLUSTERS[:-1])
        with pytest.raises(ValueError, match="one entry per resampled unit"):
            draw(strata=STRATA[:, None])


def test_group_codes_and_counts_to_indices():
    codes = group_codes(CLUSTERS, N)
    labels = sorted(set(CLUSTERS.tolist()))
    assert codes.tolist() == [labels.index(c) for c in CLUSTERS]
    assert (group_codes(None, 4) == np.arange(4)).all()
    for row in bootstrap_counts(N, 10, 1):
        idx = counts_to_indices(row)
        assert len(idx) == N and (np.bincount(idx, minlength=N) == row).all()
        assert (idx == np.sort(idx)).all()


def test_percentile_ci_is_the_percentile_of_defined_resamples():
    rng = np.random.default_rng(4)
    values = rng.normal(size=301)
    values[rng.random(301) < 0.2] = np.nan
    defined = values[~np.isnan(values)]
    for ci in (0.5, 0.8, 0.9, 0.95, 0.99, 0.9973):
        ours = percentile_ci(values, ci)
        assert ours == tuple(np.percentile(defined, [50 * (1 - ci), 50 * (1 + ci)]))
        alpha = 1 - ci  # the way ctclip.metrics wrote it before: the same floats for ci >= 0.5
        assert ours == tuple(np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    assert percentile_ci(list(defined[:50])) == percentile_ci(defined[:50], 0.95)  # default 0.95, lists
    assert all(math.isnan(b) for b in percentile_ci(np.full(4, np.nan)))
    assert all(math.isnan(b) for b in percentile_ci(np.array([]), 0.9))

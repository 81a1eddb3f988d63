"""The streaming engine: series through the CNN ensemble, slices batched across series.

    for out in stream_series(jobs, settings, ens, batch_size=32, num_workers=8, want_features=True):
        out.job, out.kept, out.probs["DenseNet121_change_avg_256"]   # (S, folds, 6), mean over TTA passes

DataLoader workers decode, window and resize one series per item (`hemorrhage.inference_data.SeriesInputs`,
the three-slice input needs a slice's neighbours); the main process gathers items until they hold
`batch_size` slices, so short series still fill batches, moves the uint8 inputs to the device once and
runs every fold of every member on them (`run_group`, `hemorrhage.ensemble.CNNEnsemble.predict`), then
splits the outputs back per series and yields the series in input order. Inference
(`hemorrhage.run.inference`) and feature extraction (`hemorrhage.run.features`) both run through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from hemorrhage.ensemble import CNNEnsemble
from hemorrhage.inference_data import SeriesInputs, SeriesJob, identity_collate
from hemorrhage.inputs import InputSettings
from hemorrhage.series import resolve_workers

log = logging.getLogger(__name__)


@dataclass
class SeriesOutput:
    """The CNN outputs of one series, as `stream_series` yields them."""

    job: SeriesJob
    kept: np.ndarray  # indices into the job's slices (the ones that decoded)
    quirk: np.ndarray  # (S,) bool: BitsStored-12 fix applied
    probs: dict[str, np.ndarray]  # member label -> (S, folds, 6), mean over TTA passes
    features: dict[str, np.ndarray]  # member label -> (S, folds, feature_dim); empty unless asked for
    window_fallback: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (S,) DEFAULT_WINDOW used


def stream_series(jobs: list[SeriesJob], settings: InputSettings, ens: CNNEnsemble, *, batch_size: int,
                  num_workers: int, want_features: bool = False, progress: bool = True,
                  failed: list[tuple[str, str, str]] | None = None, timing: dict[str, float] | None = None
                  ) -> Iterator[SeriesOutput]:
    """Stream the series through the ensemble, batching slices across series; yields each series in order.

    Files that fail to decode are appended to `failed` as (path, stage, error); a series with no readable
    slice is logged and not yielded. `timing` accumulates "wait_for_data" and "cnn" seconds.
    """
    from tqdm.auto import tqdm

    failed = [] if failed is None else failed
    timing = {} if timing is None else timing
    timing.setdefault("wait_for_data", 0.0)
    timing.setdefault("cnn", 0.0)
    workers = min(resolve_workers(num_workers), len(jobs))
    loader = DataLoader(SeriesInputs(jobs, settings), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=identity_collate, pin_memory=ens.device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    pending: list[dict] = []

    def flush() -> list[SeriesOutput]:
        t = time.perf_counter()
        outs = run_group(ens, pending, batch_size, want_features)
        timing["cnn"] += time.perf_counter() - t
        done = [SeriesOutput(jobs[it["index"]], it["kept"].numpy(), it["quirk"].numpy(), probs, feats,
                             it["window_fallback"].numpy())
                for it, (probs, feats) in zip(pending, outs)]
        pending.clear()
        return done

    with tqdm(total=sum(j.n_slices for j in jobs), desc="predict", unit="slice",
              disable=None if progress else True) as bar:
        t = time.perf_counter()
        for item in loader:
            timing["wait_for_data"] += time.perf_counter() - t
            job = jobs[item["index"]]
            for e in item["errors"]:
                log.error("failed: %s: %s", e[0], e[2])
            failed += [tuple(e) for e in item["errors"]]
            if item["inputs"]:
                pending.append(item)
                if sum(len(it["kept"]) for it in pending) >= batch_size:
                    yield from flush()
            else:
                log.error("series %s: no readable slice, left out", job.series_uid)
            bar.update(job.n_slices)
            t = time.perf_counter()
        if pending:
            yield from flush()



def run_group(ens: CNNEnsemble, items: list[dict], batch_size: int, want_features: bool
              ) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Predict every slice of `items` in batches of `batch_size`; split the results back per series."""
    inputs = {s: torch.cat([it["inputs"][s] for it in items], 1).to(ens.device, non_blocking=True)
              for s in ens.sizes}
    total = next(iter(inputs.values())).shape[1]
    probs: dict[str, list[torch.Tensor]] = {m.label: [] for m in ens.members}
    feats: dict[str, list[torch.Tensor]] = {m.label: [] for m in ens.members}
    for start in range(0, total, batch_size):
        out = ens.predict({s: x[:, start:start + batch_size] for s, x in inputs.items()}, want_features)
        for label, o in out.items():
            probs[label].append(o.probs)
            if want_features:
                feats[label].append(o.features)
    all_p = {k: torch.cat(v).cpu().numpy() for k, v in probs.items()}
    all_f = {k: torch.cat(v).cpu().numpy() for k, v in feats.items()} if want_features else {}
    results, start = [], 0
    for it in items:
        n = len(it["kept"])
        results.append(({k: v[start:start + n] for k, v in all_p.items()},
                        {k: v[start:start + n] for k, v in all_f.items()}))
        start += n
    return results

"""The CNN training's validation: labelled slices of the validation series through the inference
preprocessing (header window, no TTA, the centre crop), gathered over the ranks (run by
`hemorrhage.run.train_cnn`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ctcore.distributed import is_initialized
from hemorrhage.inference_data import SeriesInputs, identity_collate
from hemorrhage.inputs import InputSettings, parse_tta
from hemorrhage.models.cnn import normalize_uint8
from hemorrhage.train_data import TrainSeries
from hemorrhage.windows import parse_window_spec


@torch.inference_mode()
def predict_series_probs(model: torch.nn.Module, series: list[TrainSeries], size: int, device: torch.device,
                         autocast, batch_size: int, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled slices of `series` through the inference preprocessing -> (labels (N, 6), probs (N, 6))."""
    settings = InputSettings(parse_window_spec("header"), (size,), parse_tta("0"))
    loader = DataLoader(SeriesInputs([s.job for s in series], settings), batch_size=None, num_workers=num_workers,
                        collate_fn=identity_collate)
    ys, ps = [], []
    model.eval()
    for item in loader:
        s = series[item["index"]]
        if not item["inputs"]:
            continue
        x = item["inputs"][size][0]
        kept = item["kept"].numpy()
        probs = []
        for i in range(0, len(x), batch_size):
            xb = normalize_uint8(x[i:i + batch_size].to(device))
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast():
                probs.append(torch.sigmoid(model(xb).float()).cpu())
        p = torch.cat(probs).numpy()
        y = s.labels[kept]
        ok = ~np.isnan(y[:, 0])
        ys.append(y[ok])
        ps.append(p[ok])
    if not ys:
        return np.zeros((0, 6), np.float32), np.zeros((0, 6), np.float32)
    return np.concatenate(ys), np.concatenate(ps)


def gather_arrays(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not is_initialized():
        return y, p
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (y, p))
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])

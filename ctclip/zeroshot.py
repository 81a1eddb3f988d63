"""Zero-shot classification of the 18 CT-RATE findings (DESIGN 4.5).

For each finding, the volume embedding is compared with the embeddings of a positive and a negative
prompt (CT-CLIP's "{} is present." / "{} is not present."); a softmax over the pair of scaled
similarities gives P(present). Used for validation during training; the full evaluation with
confidence intervals builds on the same functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ctclip.findings import FINDINGS

DEFAULT_TEMPLATES: tuple[str, str] = ("{} is present.", "{} is not present.")


@torch.inference_mode()
def prompt_features(model, findings: Sequence[str] = FINDINGS,
                    templates: tuple[str, str] = DEFAULT_TEMPLATES, device: torch.device | str = "cpu") -> torch.Tensor:
    """(F, 2, E) normalised text embeddings of the (present, absent) prompts of every finding."""
    texts = [t.format(f) for f in findings for t in templates]
    tokens = model.tokenize(texts).to(device)
    feats = model.encode_text(tokens).float()
    return feats.view(len(findings), 2, -1)


@torch.inference_mode()
def zero_shot_scores(volume_feats: torch.Tensor, prompt_feats: torch.Tensor, logit_scale: float) -> np.ndarray:
    """P(present) per volume and finding: softmax over the (present, absent) pair. (N, F)."""
    sims = torch.einsum("ne,fke->nfk", volume_feats.float(), prompt_feats.float()) * logit_scale
    return sims.softmax(dim=-1)[..., 0].cpu().numpy()


@torch.inference_mode()
def encode_loader(model, loader, device: torch.device, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, np.ndarray]:
    """Volume embeddings and labels for every batch of a (volume, labels) loader."""
    feats, labels = [], []
    for volumes, y in loader:
        with autocast():
            feats.append(model.encode_volume(volumes.to(device, non_blocking=True)).float().cpu())
        labels.append(np.asarray(y, dtype=np.float32))
    return torch.cat(feats), np.concatenate(labels)


def auroc_per_finding(labels: np.ndarray, scores: np.ndarray, findings: Sequence[str] = FINDINGS) -> dict[str, float]:
    """AUROC per finding; rows with a NaN label are left out for that finding; NaN when one class only."""
    out = {}
    for j, name in enumerate(findings):
        keep = ~np.isnan(labels[:, j])
        y, s = labels[keep, j], scores[keep, j]
        out[name] = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")
    return out


def mean_defined(values: dict[str, float]) -> float:
    defined = [v for v in values.values() if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")

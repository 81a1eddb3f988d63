"""Report <-> volume retrieval: recall@k in both directions (DESIGN 4.5).

Reconstructions of one scan share one report, and short normal reports can repeat word for word, so
the text gallery holds each distinct report text once and relevance is "has the same report text":
volume -> text is a hit when the volume's report is among the k most similar texts; text -> volume
is a hit when any volume with that report is among the k most similar volumes. Ranks count ties
against the model (an equally similar wrong item ranks ahead), so a constant embedding scores chance
or worse, never better. Chance recall@k is k / gallery size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def recall_at_k(volume_feats: torch.Tensor, text_feats: torch.Tensor, text_of_volume: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """volume_feats (N, E) and text_feats (M, E), L2-normalised; text_of_volume (N,) indexes the
    gallery text of each volume. Returns {"volume_to_text": {"R@1": ..}, "text_to_volume": {..}, ...}."""
    sims = (volume_feats.float() @ text_feats.float().T).numpy()  # (N, M)
    n, m = sims.shape
    rows = np.arange(n)
    true_sim = sims[rows, text_of_volume]
    wrong = np.ones_like(sims, dtype=bool)
    wrong[rows, text_of_volume] = False
    v2t_rank = np.sum((sims >= true_sim[:, None]) & wrong, axis=1)  # wrong texts at least as similar

    relevant = ~wrong.T  # (M, N): volume j has text i
    best_relevant = np.where(relevant, sims.T, -np.inf).max(axis=1)  # every gallery text has a volume
    t2v_rank = np.sum((sims.T >= best_relevant[:, None]) & ~relevant, axis=1)

    def recalls(ranks: np.ndarray, gallery: int) -> dict[str, float]:
        out = {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
        out.update({f"chance@{k}": min(1.0, k / gallery) for k in ks})
        out["median_rank"] = float(np.median(ranks) + 1)
        out["n_queries"], out["gallery"] = int(len(ranks)), int(gallery)
        return out

    return {"volume_to_text": recalls(v2t_rank, m), "text_to_volume": recalls(t2v_rank, n)}


def text_gallery(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts (first-seen order) and, per input, the index of its text in that list."""
    index: dict[str, int] = {}
    of = np.array([index.setdefault(t, len(index)) for t in texts], dtype=np.int64)
    return list(index), of

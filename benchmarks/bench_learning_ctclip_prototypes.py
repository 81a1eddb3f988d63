"""Learning benchmark, chest half: what the joint embedding space holds about each finding, apart from the prompts.

Zero-shot scoring asks the text tower to place two short prompts ("X is present." / "X is not present.")
so that their difference points along finding X. A low zero-shot AUROC can mean the image embeddings do not
separate X, or that they do and the prompts miss the direction. The report-prototype score separates the two:
each finding's direction is the mean embedding of the training reports that have it minus the mean of those
that do not (the reports as training saw them, whole), and a test volume's score is its embedding's
projection on that direction. Its AUROC is the same joint space read without prompts; the gap to zero-shot
is what the prompts lose. It uses the training labels, so it is a diagnostic beside the zero-shot result,
never a substitute for it.

The same direction read on the text side (`prototype_aurocs(...)["reports"]`, when the set has
test_reports.csv): the test reports' own embeddings projected on it. A finding low there is one the text
tower does not tell apart in the reports themselves, whatever the images hold; a finding high there and low
for the volumes is one the image side has not matched.

A third reading, of the image side alone (`embedding_probe_aurocs`): a logistic regression per finding on the
frozen volume embeddings of the training volumes, scored on the test volumes. It bounds what any text direction
could read from those embeddings linearly: a finding low there is one the image tower has not learned to carry
at all (not one the prompts or the report directions miss), though the supervised probe
(bench_probe_ctclip.py) shows the same encoder can learn it from the labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ctclip.checkpoint import load_trained_model
from ctclip.data.reports import load_labels, load_reports, report_text, text_columns
from ctclip.data.store import VolumeStore
from ctclip.findings import FINDINGS


def _embed_volumes(model, store: VolumeStore, names: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(names), batch):
        x = torch.from_numpy(np.stack([store.read(n) for n in names[i:i + batch]])).unsqueeze(1)
        out.append(model.encode_volume(x))
    return torch.cat(out)


def _embed_labelled(model, store_path: Path, labels) -> tuple[list[str], torch.Tensor]:
    """The labelled volumes `store_path` holds (in the labels' order) and their float embeddings."""
    with VolumeStore(store_path) as store, torch.inference_mode():
        have = set(store.names())
        names = [n for n in labels.index if n in have]
        return names, _embed_volumes(model, store, names).float()


def _embed_texts(model, texts: list[str], batch: int = 64) -> torch.Tensor:
    return torch.cat([model.encode_text(model.tokenize(texts[i:i + batch])) for i in range(0, len(texts), batch)])


def report_prototype_aurocs(model_path: Path, data: Path) -> dict[str, float]:
    """Per-finding test AUROC of the report-prototype score of the test volumes (module docstring)."""
    return prototype_aurocs(model_path, data)["volumes"]


def prototype_aurocs(model_path: Path, data: Path) -> dict[str, dict[str, float]]:
    """Per-finding test AUROCs of the report-prototype direction (module docstring) for a trained checkpoint and a
    set this benchmark built (`data`: train_reports.csv, train_predicted_labels.csv, valid_volumes.h5,
    test_predicted_labels.csv; test_reports.csv for "reports"): "volumes" scores the test volumes' embeddings,
    "reports" the test reports' ({} without test_reports.csv). Findings with one class on either side are left
    out."""
    model, meta = load_trained_model(model_path)
    column = ((meta.get("config") or {}).get("text_column")) or "findings_impressions"
    columns = text_columns(column)
    reports = load_reports(data / "train_reports.csv")
    train_labels = load_labels(data / "train_predicted_labels.csv")
    names = [n for n in reports.index if n in train_labels.index]
    texts = [report_text(reports.loc[n], columns) for n in names]
    test_labels = load_labels(data / "test_predicted_labels.csv")
    test_reports = load_reports(data / "test_reports.csv") if (data / "test_reports.csv").is_file() else None
    test_names, z_vol = _embed_labelled(model, data / "valid_volumes.h5", test_labels)
    with torch.inference_mode():
        z_text = _embed_texts(model, texts).float()
        report_names = [n for n in test_labels.index if test_reports is not None and n in test_reports.index]
        z_test_text = (_embed_texts(model, [report_text(test_reports.loc[n], columns) for n in report_names]).float()
                       if report_names else None)
    y_train = train_labels.loc[names, list(FINDINGS)].to_numpy()
    out: dict[str, dict[str, float]] = {"volumes": {}, "reports": {}}
    for key, z, side in (("volumes", z_vol, test_names), ("reports", z_test_text, report_names)):
        if z is None:
            continue
        y_test = test_labels.loc[side, list(FINDINGS)].to_numpy()
        for k, finding in enumerate(FINDINGS):
            pos, neg = y_train[:, k] == 1, y_train[:, k] == 0
            known = ~np.isnan(y_test[:, k])
            if not pos.any() or not neg.any() or len(np.unique(y_test[known, k])) < 2:
                continue
            direction = z_text[torch.from_numpy(pos)].mean(0) - z_text[torch.from_numpy(neg)].mean(0)
            scores = (z @ direction).numpy()
            out[key][finding] = float(roc_auc_score(y_test[known, k], scores[known]))
    return out


def embedding_probe_aurocs(model_path: Path, data: Path) -> dict[str, float]:
    """Per-finding test AUROC of a logistic regression (sklearn defaults, L2, C = 1) fitted on the frozen volume
    embeddings of `data`/train_volumes.h5 with train_predicted_labels.csv, scored on valid_volumes.h5 with
    test_predicted_labels.csv (module docstring). Findings with one class on either side, or unknown labels
    only, are left out; volumes with an unknown label are left out of that finding."""
    model, _ = load_trained_model(model_path)
    train_labels = load_labels(data / "train_predicted_labels.csv")
    test_labels = load_labels(data / "test_predicted_labels.csv")
    train_names, x_train = _embed_labelled(model, data / "train_volumes.h5", train_labels)
    test_names, x_test = _embed_labelled(model, data / "valid_volumes.h5", test_labels)
    x_train, x_test = x_train.numpy(), x_test.numpy()
    y_train = train_labels.loc[train_names, list(FINDINGS)].to_numpy()
    y_test = test_labels.loc[test_names, list(FINDINGS)].to_numpy()
    out: dict[str, float] = {}
    for k, finding in enumerate(FINDINGS):
        fit, score = ~np.isnan(y_train[:, k]), ~np.isnan(y_test[:, k])
        if len(np.unique(y_train[fit, k])) < 2 or len(np.unique(y_test[score, k])) < 2:
            continue
        clf = LogisticRegression(max_iter=2000).fit(x_train[fit], y_train[fit, k].astype(int))
        out[finding] = float(roc_auc_score(y_test[score, k], clf.decision_function(x_test[score])))
    return out

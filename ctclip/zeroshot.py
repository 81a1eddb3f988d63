"""Zero-shot classification of the 18 CT-RATE findings (DESIGN 4.5).

For each finding, the volume embedding is compared with the embeddings of a positive and a negative
prompt (CT-CLIP's "{} is present." / "{} is not present."); a softmax over the pair of scaled
similarities gives P(present) = sigmoid(margin), margin = scale * (cos(v, present) - cos(v, absent)).
Several templates per side are averaged (prompt ensembling: mean of the normalised text embeddings,
normalised again). Used for validation during training and by `ctclip.run.evaluate` for the full evaluation.

Rankings (AUROC, AUPRC, thresholds) use the margin, in float64, never the probability: a softmax in
float32 returns exactly 1.0 for every margin above ~17 (float64: ~37), so confident volumes would tie and
move the AUROC; with the learned scale near its cap of 100 that is most positives. The probabilities are
still what the outputs show.

Presets: `ctclip` (the default, CT-CLIP's pair with the model's learned scale), `ensemble` (four pairs),
`seed` (the seed's validation: "{}" / "no {}" with the finding as named, softmax over unscaled cosines,
i.e. scale 1; it gives the seed's probabilities, and the same ranking as any other scale).

Template files (`--templates path`): YAML or JSON ``{"positive": [...], "negative": [...]}``, or a text
file whose first line is the positive and second line the negative template. In a template, ``{}``
is the finding as named in the labels CSV and ``{lower}`` the same in lower case. An optional
``logit_scale`` key sets the score's scale (a number; default: the model's learned scale). Every positive
template names the finding; a negative template may instead be a shared normal reference without a
placeholder ("No significant pathology."), the same for every finding: a text tower that never saw
"No <finding>." in its reports scores such a reference better than a negated finding name.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from ctclip.findings import FINDINGS

DEFAULT_TEMPLATES: tuple[str, str] = ("{} is present.", "{} is not present.")


@dataclass(frozen=True)
class Templates:
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    logit_scale: float | None = None  # None: the model's learned scale (CT-CLIP); 1.0: unscaled cosines (the seed)

    def scale(self, model_scale: float) -> float:
        return float(model_scale if self.logit_scale is None else self.logit_scale)

    def render(self, finding: str) -> tuple[list[str], list[str]]:
        def fill(t: str) -> str:
            return t.replace("{lower}", finding.lower()).replace("{}", finding)
        return [fill(t) for t in self.positive], [fill(t) for t in self.negative]


TEMPLATE_PRESETS: dict[str, Templates] = {
    "ctclip": Templates((DEFAULT_TEMPLATES[0],), (DEFAULT_TEMPLATES[1],)),
    "ensemble": Templates(
        ("{} is present.", "There is {lower}.", "Findings consistent with {lower}.", "{} is seen."),
        ("{} is not present.", "There is no {lower}.", "No evidence of {lower}.", "{} is not seen."),
    ),
    "seed": Templates(("{}",), ("no {}",), logit_scale=1.0),
}


def load_templates(spec: str | Path) -> Templates:
    """A preset name (ctclip, ensemble) or a template file (see the module docstring)."""
    if str(spec) in TEMPLATE_PRESETS:
        return TEMPLATE_PRESETS[str(spec)]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--templates {spec}: neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(text)  # JSON is YAML
        except yaml.YAMLError as e:
            raise ValueError(f"--templates {path}: not valid YAML/JSON ({e})") from e
        if not isinstance(data, dict) or not {"positive", "negative"} <= set(data):
            raise ValueError(f"--templates {path}: expected keys 'positive' and 'negative'")
        pos, neg = data["positive"], data["negative"]
        pos, neg = [pos] if isinstance(pos, str) else pos, [neg] if isinstance(neg, str) else neg
        scale = data.get("logit_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"--templates {path}: logit_scale must be a positive number, got {scale!r}")
    else:
        scale = None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(lines) != 2:
            raise ValueError(f"--templates {path}: a text file needs exactly 2 lines (positive, negative)")
        pos, neg = [lines[0]], [lines[1]]
    for t in [*pos, *neg]:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"--templates {path}: template {t!r} is not a non-empty string")
    for t in pos:  # a positive without the finding's name would be the same prompt for every finding
        if not re.search(r"\{(lower)?\}", t):
            raise ValueError(f"--templates {path}: positive template {t!r} has no {{}} or {{lower}} placeholder")
    if not pos or not neg:
        raise ValueError(f"--templates {path}: needs at least one positive and one negative template")
    return Templates(tuple(pos), tuple(neg), None if scale is None else float(scale))


@torch.inference_mode()
def prompt_features(model, findings: Sequence[str] = FINDINGS,
                    templates: tuple[str, str] | Templates = DEFAULT_TEMPLATES,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """(F, 2, E) normalised text embeddings of the (present, absent) prompts of every finding."""
    if not isinstance(templates, Templates):
        templates = Templates((templates[0],), (templates[1],))
    n_pos, n_neg = len(templates.positive), len(templates.negative)
    texts = [t for finding in findings for side in templates.render(finding) for t in side]
    feats = model.encode_text(model.tokenize(texts).to(device)).float().view(len(findings), n_pos + n_neg, -1)
    sides = torch.stack([feats[:, :n_pos].mean(1), feats[:, n_pos:].mean(1)], dim=1)  # (F, 2, E)
    return torch.nn.functional.normalize(sides, dim=-1)


@torch.inference_mode()
def zero_shot_margins(volume_feats: torch.Tensor, prompt_feats: torch.Tensor, logit_scale: float) -> np.ndarray:
    """The logit of P(present) per volume and finding, float64 (N, F): scale * (cos(v, present) - cos(v,
    absent)). Rank by this; `probabilities` turns it into the softmax's P(present)."""
    sims = torch.einsum("ne,fke->nfk", volume_feats.double().cpu(), prompt_feats.double().cpu())
    return ((sims[..., 0] - sims[..., 1]) * float(logit_scale)).numpy()


def probabilities(margins: np.ndarray) -> np.ndarray:
    """P(present) = softmax over the pair = sigmoid(margin), float64."""
    return expit(np.asarray(margins, dtype=np.float64))


def zero_shot_scores(volume_feats: torch.Tensor, prompt_feats: torch.Tensor, logit_scale: float) -> np.ndarray:
    """P(present) per volume and finding (N, F), float64. For ranking use `zero_shot_margins`."""
    return probabilities(zero_shot_margins(volume_feats, prompt_feats, logit_scale))


@torch.inference_mode()
def encode_loader(model, loader, device: torch.device, autocast=contextlib.nullcontext,
                  hasher: hashlib._Hash | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Volume embeddings and labels for every batch of a (volume, labels) loader. With `hasher`, the
    uint8 volumes are fed to it in loader order (a checksum of exactly the data evaluated)."""
    feats, labels = [], []
    for volumes, y in loader:
        if hasher is not None:
            hasher.update(volumes.cpu().contiguous().numpy())
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


# ---- evaluation units ------------------------------------------------------------------------------

_NAME = re.compile(r"^(?P<split>[A-Za-z]+)_(?P<pid>[^_]+)_(?P<scan>[^_]+)_(?P<recon>[^_.]+)(\.nii(\.gz)?)?$")


def scan_of(volume_name: str) -> str:
    """`valid_53_a_1.nii.gz` -> `valid_53_a` (reconstructions of one scan share it)."""
    m = _NAME.match(volume_name)
    if not m:
        raise ValueError(f"{volume_name}: not a CT-RATE volume name (<split>_<pid>_<scan>_<recon>.nii.gz)")
    return f"{m['split']}_{m['pid']}_{m['scan']}"


def patient_of(unit_name: str) -> str:
    """`valid_53_a_1.nii.gz` or `valid_53_a` -> `valid_53`; other names are their own patient."""
    parts = unit_name.split("_")
    return "_".join(parts[:2]) if len(parts) >= 3 else unit_name


def aggregate_by_scan(names: Sequence[str], scores: np.ndarray, labels: np.ndarray) -> tuple[list[str], np.ndarray,
                                                                                              np.ndarray, int]:
    """Max over the reconstructions of each scan, for scores and labels (labels of one scan should
    agree; the number of scan x finding pairs where they do not is returned, the max is kept)."""
    scans = [scan_of(n) for n in names]
    unique, inverse = np.unique(scans, return_inverse=True)
    agg_scores = np.full((len(unique), scores.shape[1]), -np.inf)
    np.maximum.at(agg_scores, inverse, scores)
    filled = np.where(np.isnan(labels), -np.inf, labels)
    agg_labels = np.full((len(unique), labels.shape[1]), -np.inf)
    np.maximum.at(agg_labels, inverse, filled)
    lo = np.full_like(agg_labels, np.inf)
    np.minimum.at(lo, inverse, np.where(np.isnan(labels), np.inf, labels))
    disagree = int(np.sum(np.isfinite(lo) & (lo != agg_labels)))
    agg_labels[np.isinf(agg_labels)] = np.nan
    return list(unique), agg_scores, agg_labels, disagree

"""Zero-shot evaluation of a trained 3D CLIP model: scores, metrics with CIs, ROC figure, retrieval.

    python scripts/ctclip_eval.py --model_path runs/vitb/best.pt --test_data data/valid_volumes.h5 \
        --test_labels data/ct_rate/test_predicted_labels.csv --reports data/ct_rate/test_reports.csv \
        --output_dir runs/vitb/eval_test

Steps: load the model from its training checkpoint -> encode every labelled volume of the store
(DataLoader workers, inference mode, bf16 autocast on GPU; the uint8 volumes are checksummed on the
way) -> P(present) per finding from the prompt pair -> optionally the max over the reconstructions of
each scan -> `ctclip.metrics.evaluate_findings` -> files (`ctclip.run.eval_outputs`). With a reports CSV,
recall@k for report <-> volume retrieval (`ctclip.retrieval`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctclip.checkpoint import load_trained_model
from ctclip.data.dataset import CTLabelDataset, make_loader
from ctclip.data.preprocess import check_layout
from ctclip.data.reports import load_reports, report_text, text_columns
from ctclip.data.store import VolumeStore
from ctclip.findings import FINDINGS
from ctclip.metrics import PROTOCOLS, EvaluationResult, ThresholdRule, evaluate_findings
from ctclip.retrieval import recall_at_k, text_gallery
from ctclip.run.eval_outputs import file_sha256, write_outputs
from ctclip.zeroshot import (
    aggregate_by_scan,
    encode_loader,
    load_templates,
    patient_of,
    prompt_features,
    zero_shot_margins,
)
from ctcore.errors import UsageError
from ctcore.precision import CHOICES as PRECISION_CHOICES
from ctcore.precision import autocast_factory, resolve_precision
from ctcore.schema import arg

log = logging.getLogger(__name__)


class EvalError(UsageError):
    """The evaluation cannot run; the message names the file, column, volume or flag."""


@dataclass
class EvalConfig:
    model_path: Path = arg(help="training checkpoint (best.pt / latest.pt of ctclip_train.py)")
    test_data: Path = arg(help="HDF5 store holding the test volumes (ctclip_preprocess.py)")
    test_labels: Path = arg(help="labels CSV: VolumeName + the 18 findings (0/1/empty)")
    output_dir: Path = Path("runs/ctclip_eval")
    reports: Path | None = arg(None, help="reports CSV of the test volumes: adds report<->volume retrieval")
    text_column: str | None = arg(None, help="report text for retrieval (default: the one the model was trained on)")
    templates: str = arg("ctclip", help="prompt templates: a preset (ctclip: '{} is present.'/'{} is not present.' "
                                        "with the model's scale, CT-CLIP's; seed: '{}'/'no {}' with unscaled "
                                        "cosines, the seed's validation; ensemble) or a YAML/JSON/text file (see "
                                        "ctclip/zeroshot.py)")
    metric_protocol: str = arg("standard", choices=["standard", "ctclip"],
                               help="standard: real bootstrap CIs, binary F1; ctclip: the CT-CLIP reference "
                                    "code's numbers (no resampling)")
    threshold: str | None = arg(None, help="operating point: youden | ctclip | fixed:<p> | file:<summary.json of "
                                           "a validation run> (default: youden; ctclip under --metric_protocol "
                                           "ctclip)")
    n_bootstrap: int = 1000
    ci: float = 0.95
    bootstrap_seed: int = 0
    bootstrap_unit: str = arg("patient", choices=["patient", "unit"],
                              help="resample patients (all their volumes together: CT-RATE has several per "
                                   "patient) or single units")
    stratified: bool = arg(False, help="resample positives and negatives separately (with --bootstrap_unit unit)")
    aggregate: str = arg("volume", choices=["volume", "scan"],
                         help="scan: max over the reconstructions of each scan (the CT-CLIP paper counted scans)")
    allow_missing: bool = arg(False, help="evaluate even if some labelled volumes are not in the store")
    batch_size: int = 4
    num_workers: int = 2
    device: str | None = arg(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    precision: str = arg("auto", choices=PRECISION_CHOICES,
                         help="auto: bf16 autocast on GPU, fp32 on CPU; bf16 | fp16 | fp32 (none, off)")


def check_config(cfg: EvalConfig) -> None:
    if cfg.metric_protocol not in PROTOCOLS:
        raise EvalError(f"--metric_protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.metric_protocol!r}")
    if cfg.metric_protocol == "ctclip" and cfg.threshold not in (None, "ctclip"):
        raise EvalError(f"--metric_protocol ctclip fixes the threshold rule to ctclip; got --threshold {cfg.threshold}")
    if cfg.aggregate not in ("volume", "scan"):
        raise EvalError(f"--aggregate must be volume or scan, got {cfg.aggregate!r}")
    if cfg.bootstrap_unit not in ("patient", "unit"):
        raise EvalError(f"--bootstrap_unit must be patient or unit, got {cfg.bootstrap_unit!r}")
    if cfg.stratified and cfg.bootstrap_unit == "patient":
        raise EvalError("--stratified resamples single units: use it with --bootstrap_unit unit")
    if not 0 < cfg.ci < 1:
        raise EvalError(f"--ci must be in (0, 1), got {cfg.ci}")
    if cfg.n_bootstrap < 0 or cfg.batch_size < 1:
        raise EvalError("--n_bootstrap must be >= 0 and --batch_size >= 1")
    for flag, path in (("--model_path", cfg.model_path), ("--test_data", cfg.test_data),
                       ("--test_labels", cfg.test_labels), ("--reports", cfg.reports)):
        if path is not None and not Path(path).is_file():
            raise EvalError(f"{flag} {path}: no such file")


def threshold_rules(spec: str | None, protocol: str, findings=FINDINGS) -> tuple[dict[str, ThresholdRule], list[str]]:
    """Per-finding rules from --threshold, and notes (e.g. findings a threshold file lacks)."""
    spec = spec or ("ctclip" if protocol == "ctclip" else "youden")
    if spec in ("youden", "ctclip"):
        return dict.fromkeys(findings, ThresholdRule(spec)), []
    if spec.startswith("fixed:"):
        try:
            value = float(spec[len("fixed:"):])
        except ValueError:
            raise EvalError(f"--threshold {spec}: expected fixed:<probability>, e.g. fixed:0.5") from None
        return dict.fromkeys(findings, ThresholdRule("fixed", value)), []
    if spec.startswith("file:"):
        return _rules_from_file(Path(spec[len("file:"):]), findings)
    raise EvalError(f"--threshold {spec}: expected youden, ctclip, fixed:<p> or file:<summary.json>")


def _rules_from_file(path: Path, findings) -> tuple[dict[str, ThresholdRule], list[str]]:
    """Thresholds of a validation run (its summary.json, or a plain {finding: threshold} JSON)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"--threshold file:{path}: not a readable JSON file ({e})") from e
    table = data.get("thresholds", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise EvalError(f"--threshold file:{path}: expected a 'thresholds' mapping of finding -> threshold")
    rules, fallback = {}, []
    for name in findings:
        value = table.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            rules[name] = ThresholdRule("fixed", float(value))
        else:  # undefined in the validation run (one class there): choose on this set, and say so
            rules[name] = ThresholdRule("youden")
            fallback.append(name)
    notes = [f"thresholds from {path}" + (f"; no finite threshold there for {', '.join(fallback)}: Youden on "
                                          "this set instead" if fallback else "")]
    return rules, notes


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; write every output into cfg.output_dir; return the summary dict."""
    check_config(cfg)
    rules, rule_notes = threshold_rules(cfg.threshold, cfg.metric_protocol)
    templates = load_templates(cfg.templates)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, meta = load_trained_model(cfg.model_path, device)
    data = _dataset(cfg, meta)
    precision = resolve_precision(cfg.precision, device)
    autocast, _ = autocast_factory(precision, device)
    loader = make_loader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda")
    hasher = hashlib.sha256()
    t = time.perf_counter()
    feats, labels = encode_loader(model, loader, device, autocast, hasher)
    timings["encode_volumes_s"] = time.perf_counter() - t
    model_scale = float(model.temperature_scale().detach())
    scale = templates.scale(model_scale)
    # ranked by the margin (the logit of P(present), float64): probabilities tie at 1.0 when saturated
    scores = zero_shot_margins(feats, prompt_features(model, FINDINGS, templates, device), scale)

    units, unit_scores, unit_labels = list(data.names), scores, labels
    notes = list(rule_notes)
    if cfg.aggregate == "scan":
        units, unit_scores, unit_labels, disagree = aggregate_by_scan(data.names, scores, labels)
        notes.append(f"scores and labels: max over the reconstructions of each scan ({len(units)} scans from "
                     f"{len(data.names)} volumes)")
        if disagree:
            notes.append(f"{disagree} scan x finding label(s) differ between reconstructions; the max was used")
            log.warning("%d scan x finding labels differ between reconstructions of one scan", disagree)
    clusters = np.array([patient_of(u) for u in units]) if cfg.bootstrap_unit == "patient" else None
    t = time.perf_counter()
    result = evaluate_findings(unit_labels, unit_scores, FINDINGS, rule=rules,
                               protocol=PROTOCOLS[cfg.metric_protocol], n_bootstrap=cfg.n_bootstrap, ci=cfg.ci,
                               seed=cfg.bootstrap_seed, clusters=clusters, stratified=cfg.stratified, logits=True)
    timings["metrics_s"] = time.perf_counter() - t
    result.notes[:0] = notes

    retrieval = None
    if cfg.reports is not None:
        t = time.perf_counter()
        retrieval = _retrieval(cfg, meta, model, device, data.names, feats)
        timings["retrieval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    provenance = {
        "model": {"path": str(cfg.model_path), "sha256": file_sha256(cfg.model_path), "step": meta.get("step"),
                  "model_config": meta.get("model_config"), "logit_scale": model_scale},
        "data": {"test_data": str(cfg.test_data), "volumes_sha256": hasher.hexdigest(), "n_volumes": len(data),
                 "test_labels": str(cfg.test_labels), "test_labels_sha256": file_sha256(cfg.test_labels),
                 "reports": str(cfg.reports) if cfg.reports else None,
                 "reports_sha256": file_sha256(cfg.reports) if cfg.reports else None,
                 "missing_volumes": data.missing_volumes},
        "templates": {"positive": list(templates.positive), "negative": list(templates.negative),
                      "score_scale": scale, "score_scale_source": "model" if templates.logit_scale is None else "templates"},
        "device": str(device), "precision": precision, "timings": timings,
    }
    summary = write_outputs(Path(cfg.output_dir), cfg, result, units, unit_scores, unit_labels, data.names, scores,
                            retrieval, provenance)
    _log_result(result, cfg)
    return summary


def _dataset(cfg: EvalConfig, meta: dict[str, Any]) -> CTLabelDataset:
    data = CTLabelDataset(cfg.test_data, cfg.test_labels)
    if data.missing_volumes and not cfg.allow_missing:
        shown = ", ".join(data.missing_volumes[:10]) + (" ..." if len(data.missing_volumes) > 10 else "")
        raise EvalError(f"{len(data.missing_volumes)} volume(s) of {cfg.test_labels} are not in {cfg.test_data}: "
                        f"{shown} (--allow_missing evaluates the others and lists these in summary.json)")
    if len(data) == 0:
        raise EvalError(f"no volume of {cfg.test_labels} is in {cfg.test_data}")
    with VolumeStore(cfg.test_data) as store:
        shape = [int(x) for x in store.file_attrs()["target_shape"]]
        codes = store.axis_codes()
    if meta.get("store_shape") and list(meta["store_shape"]) != shape:
        log.warning("%s holds %s volumes; the model was trained on %s", cfg.test_data, shape, meta["store_shape"])
    if meta.get("store_layout") is None:
        log.warning("%s records no store layout (trained before layouts were recorded): cannot check that %s "
                    "(%s) is stored the way it was trained on", cfg.model_path, cfg.test_data, codes)
    problem = check_layout(str(cfg.test_data), codes, str(cfg.model_path), meta.get("store_layout"))
    if problem:
        raise EvalError(problem)
    return data


@torch.inference_mode()
def _retrieval(cfg: EvalConfig, meta: dict[str, Any], model, device, names: list[str],
               feats: torch.Tensor) -> dict[str, Any]:
    column = cfg.text_column or (meta.get("config") or {}).get("text_column") or "findings_impressions"
    reports = load_reports(cfg.reports)
    cols = text_columns(column)
    present = [n for n in names if n in reports.index]
    rows = reports.loc[present, list(cols)].to_dict("records")
    texts = {n: report_text(r, cols) for n, r in zip(present, rows)}
    keep = [i for i, n in enumerate(names) if texts.get(n)]
    if not keep:
        raise EvalError(f"--reports {cfg.reports}: no evaluated volume has a non-empty {column} report")
    gallery, text_of = text_gallery([texts[names[i]] for i in keep])
    text_feats = torch.cat([model.encode_text(model.tokenize(gallery[i:i + 64]).to(device)).float().cpu()
                            for i in range(0, len(gallery), 64)])
    out = recall_at_k(feats[keep], text_feats, text_of)
    out.update(text_column=column, unit="volume", n_volumes_without_report=len(names) - len(keep),
               note="relevance = same report text (reconstructions of a scan share one report); ties count "
                    "against the model")
    return out


def _log_result(result: EvaluationResult, cfg: EvalConfig) -> None:
    m = result.macro["auroc"]
    log.info("macro AUROC %.4f [%.4f, %.4f] over %d findings (%s protocol) -> %s", m["value"], m["lower"],
             m["upper"], m["n_findings"], result.protocol, cfg.output_dir)

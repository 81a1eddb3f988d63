"""Ensemble inference: a folder of head CT DICOM studies (or a prepared folder) -> hemorrhage probabilities.

    python scripts/hemorrhage_infer.py --data_dir /data/dicoms --weights_dir models/2DNet --output out/predictions.csv
    python scripts/hemorrhage_infer.py --data_dir /data/processed --tta 10 --sequence_weights runs/sequence/

Steps: the weights folder is checked (every file opened, keys and shapes compared) and the sequence heads
read before any image is; the input's series are discovered (headers only) and ordered; DataLoader
workers decode, window and resize each series (`hemorrhage.inference_data`); the main process batches
slices across series (`hemorrhage.streaming`), moves uint8 to the device and runs every fold of every
member under `torch.inference_mode()` (channels_last and bf16 autocast on CUDA by default;
`hemorrhage.ensemble`).

Outputs, named after ``--output`` (default ``predictions.csv``):

    predictions.csv            Kaggle format: ID,Label with ID = <SOPInstanceUID>_<class>, six rows per slice
    predictions_per_slice.csv  study, series, SOP, slice_index (order along the normal), position, flags,
                               the six probabilities (+ cnn_<class>, the CNN ensemble alone, with a head)
    predictions_per_study.csv  per series: slice count, failed slices, flags, max_<class> and mean_<class>
    predictions_run.json       settings, members and folds with sha256 and notes, sequence heads, input
                               counts (left out by reason, failed, BitsStored-12 fixes, slices windowed with
                               brain 40/80 for want of a header window), versions, timings
    predictions_errors.csv     every file that could not be used (path, stage, error)
    predictions_manifest.csv   DICOM input: every file with its series, order and flags (hemorrhage.series)
                               and window_fallback (1: predicted from brain 40/80, no usable header window)

`run_inference` raises `UsageError` for unusable weights or input (exit 2 in the script) and reports
failed files in the summary (exit 3) after writing everything else.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctcore.atomic import atomic_write_text
from ctcore.cli import resolved
from ctcore.errors import UsageError
from ctcore.schema import arg
from hemorrhage.cnn_run import (
    CNNRunConfig,
    check_inputs,
    describe_inputs,
    input_mismatches,
    library_versions,
    parse_input_sizes,
)
from hemorrhage.ensemble import CNNEnsemble, apply_sequence_heads_batch, ensemble_mean, sequence_folds
from hemorrhage.inference_data import InputError, SeriesJob, SourceInfo, find_series
from hemorrhage.inputs import InputSettings
from hemorrhage.models.checkpoint import sha256_file
from hemorrhage.models.sequence import slice_gaps
from hemorrhage.models.sequence_checkpoint import SequenceCheckpoint, member_label
from hemorrhage.run.inference_outputs import (
    SeriesPrediction,
    fallback_column,
    output_paths,
    predictions_frame,
    slice_frame,
    study_frame,
    write_frame,
)
from hemorrhage.series import write_manifest
from hemorrhage.streaming import SeriesOutput, stream_series

log = logging.getLogger(__name__)

SEQUENCE_CHUNK = 32  # series per sequence-head batch (their features are held until then)


@dataclass
class InferConfig(CNNRunConfig):
    output: Path = arg(Path("predictions.csv"), help="Kaggle-format CSV; the other outputs are written beside it "
                                                     "with its name as prefix")
    # a sequence-head file, or a folder of them
    sequence_weights: Path | None = arg(None, help="sequence-head checkpoint, or a folder of them (averaged); "
                                                   "trained with hemorrhage_train_sequence.py (no published "
                                                   "weights exist)")


@dataclass
class InferSummary:
    output: Path
    n_studies: int = 0
    n_series: int = 0
    n_slices: int = 0  # predicted
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)
    quirk_fixed: int = 0
    window_fallback: int = 0  # predicted slices windowed with DEFAULT_WINDOW (no usable header window)
    notes: list[str] = field(default_factory=list)  # e.g. "randomly initialised weights"
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        out = ", ".join(f"{k} {v}" for k, v in sorted(self.left_out.items())) or "none"
        total = self.timings.get("total", 0.0)
        rate = self.n_slices / total if total > 0 else 0.0
        return (f"hemorrhage_infer: {self.n_studies} studies, {self.n_series} series, {self.n_slices} slices "
                f"predicted; {len(self.failed)} files failed; left out: {out}; {self.quirk_fixed} BitsStored-12 "
                f"fixes; {self.window_fallback} without a header window (brain 40/80); {total:.1f} s "
                f"({rate:.1f} slices/s) -> {self.output}")


# ----------------------------------------------------------------------------------------- the run


def run_inference(cfg: InferConfig) -> InferSummary:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tta, spec, device, amp, inv, heads = check_inputs(cfg)
    labels = [member_label((m.name, m.image_size)) for m in inv.models]
    sizes = parse_input_sizes(cfg.input_size, labels)
    timings["check_weights"] = time.perf_counter() - t_start

    t = time.perf_counter()
    try:
        jobs, info = find_series(cfg.data_dir, num_workers=cfg.num_workers, progress=cfg.progress)
    except InputError as e:
        raise UsageError(str(e)) from e
    timings["discover"] = time.perf_counter() - t
    if info.kind == "prepared":
        log.info("%s is a prepared folder (window %s); --window does not apply", cfg.data_dir, info.window)
    for warning in input_mismatches(heads, describe_inputs(tta, spec, info, cfg.center_crop)):
        log.warning("%s", warning)

    t = time.perf_counter()
    ens = CNNEnsemble.load(inv, device, amp, input_sizes=sizes, flip_tta=tta.mode == "flip")
    folds_seq, problems = sequence_folds(ens.members, heads)
    if problems:
        raise UsageError("\n".join(problems))
    for h in heads:
        h.model.to(device)
    timings["load_models"] = time.perf_counter() - t
    notes = sorted({f"{m.label} fold {f}: {n}" for m in ens.members for f, n in zip(m.folds, m.notes) if n})
    for n in notes:
        log.warning("weights note: %s", n)

    settings = InputSettings(spec, ens.sizes, tta, cfg.center_crop, cfg.fix_bits_stored_12, cfg.seed)
    preds, failed, timings_loop = predict_series(jobs, settings, ens, heads, folds_seq, cfg)
    timings.update(timings_loop)

    t = time.perf_counter()
    summary = InferSummary(cfg.output, n_studies=len({p.job.study_uid for p in preds}), n_series=len(preds),
                           n_slices=sum(len(p.kept) for p in preds), failed=info.errors + failed,
                           left_out=dict(info.left_out), quirk_fixed=int(sum(p.quirk.sum() for p in preds)),
                           window_fallback=int(sum(p.window_fallback.sum() for p in preds)), notes=notes)
    if summary.window_fallback:
        log.warning("%d slices have no usable WindowCenter/WindowWidth: windowed with brain 40/80 (the original "
                    "could not prepare them); window_fallback in %s", summary.window_fallback,
                    output_paths(cfg.output)["per_slice"])
    paths = output_paths(cfg.output)
    write_frame(predictions_frame(preds), paths["predictions"])
    write_frame(slice_frame(preds, with_cnn=bool(heads)), paths["per_slice"])
    write_frame(study_frame(preds), paths["per_study"])
    write_frame(pd.DataFrame(summary.failed, columns=["path", "stage", "error"]), paths["errors"])
    if info.discovery is not None:
        write_manifest(info.discovery, paths["manifest"], fallback_column(preds, info.discovery),
                       ("window_fallback",))
    else:
        paths.pop("manifest")
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    summary.timings = timings
    summary.files = {k: str(v) for k, v in paths.items()}
    write_run_record(cfg, summary, info, ens, heads, folds_seq, tta.describe(), spec.describe(), device, amp)
    return summary


def predict_series(jobs: list[SeriesJob], settings: InputSettings, ens: CNNEnsemble,
                   heads: list[SequenceCheckpoint], folds_seq: list[int], cfg: InferConfig
                   ) -> tuple[list[SeriesPrediction], list[tuple[str, str, str]], dict[str, float]]:
    """Every series through the CNN ensemble (`stream_series`) and, if given, the sequence heads."""
    preds: list[SeriesPrediction] = []
    failed: list[tuple[str, str, str]] = []
    timing = {"wait_for_data": 0.0, "cnn": 0.0, "sequence": 0.0}
    chunk: list[SeriesOutput] = []

    def finish() -> None:
        t = time.perf_counter()
        cnn = [ensemble_mean(o.probs) for o in chunk]
        final = cnn
        if heads:
            final = apply_sequence_heads_batch(
                heads, folds_seq, ens.members,
                [(o.probs, o.features, np.asarray(slice_gaps([o.job.positions[k] for k in o.kept.tolist()])))
                 for o in chunk], ens.device)
        preds.extend(SeriesPrediction(o.job, o.kept, o.quirk, f, c, o.window_fallback)
                     for o, f, c in zip(chunk, final, cnn))
        chunk.clear()
        timing["sequence"] += time.perf_counter() - t

    for out in stream_series(jobs, settings, ens, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                             want_features=bool(heads), progress=cfg.progress, failed=failed, timing=timing):
        chunk.append(out)
        if len(chunk) >= SEQUENCE_CHUNK:
            finish()
    if chunk:
        finish()
    return preds, failed, timing


def write_run_record(cfg: InferConfig, summary: InferSummary, info: SourceInfo, ens: CNNEnsemble,
                     heads: list[SequenceCheckpoint], folds_seq: list[int], tta: str, window: str,
                     device: torch.device, amp: torch.dtype | None) -> Path:
    members = [{"model": m.weights.name, "weights_folder": str(m.weights.folder), "trained_size": m.weights.image_size,
                "input_size": m.input_size,
                "folds": [{"fold": f.fold, "path": str(f.path), "sha256": f.sha256, "size_bytes": f.size_bytes,
                           "epoch": e, "valLoss": v, "note": n}
                          for f, e, v, n in zip(m.weights.files, m.epochs, m.val_losses, m.notes)]}
               for m in ens.members]
    record = {
        "config": resolved(cfg),
        "input": {"kind": info.kind, "root": str(info.root), "files": info.n_files,
                  "window": info.window if info.kind == "prepared" else window, "studies": summary.n_studies,
                  "series": summary.n_series, "slices_predicted": summary.n_slices, "files_failed": len(summary.failed),
                  "left_out": summary.left_out, "bits_stored_12_fixed": summary.quirk_fixed,
                  "window_fallback": summary.window_fallback},
        "ensemble": {"members": members, "tta": tta, "center_crop": cfg.center_crop,
                     "averaging": "sigmoid probabilities: mean over TTA passes, then folds, then members"},
        "sequence_heads": [{"path": str(h.path), "sha256": sha256_file(h.path), "members": [member_label(k) for k in
                            h.members], "fold": h.fold, "epoch": h.epoch, "valLoss": h.val_loss,
                            "rnn": h.model.cfg.rnn, "trained_on_inputs": h.inputs} for h in heads],
        "sequence_cnn_folds": folds_seq,
        "weights_notes": summary.notes,
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                   platform.processor() or platform.machine(), "amp": str(amp).replace("torch.", "") if amp else "none",
                   "channels_last": ens.channels_last},
        "versions": library_versions(),
        "timings_s": {k: round(v, 3) for k, v in summary.timings.items()},
        "outputs": summary.files,
    }
    return atomic_write_text(Path(summary.files["run"]), json.dumps(record, indent=2, default=str))

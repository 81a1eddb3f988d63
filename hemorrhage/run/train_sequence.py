"""Train the sequence head on extracted CNN features (scripts/hemorrhage_train_sequence.py).

    python scripts/hemorrhage_train_sequence.py --features_dir runs/features --labels stage_2_train.csv \\
        --output_dir runs/sequence --fold 0
    python scripts/hemorrhage_infer.py --data_dir D --weights_dir runs/2DNet --sequence_weights runs/sequence

Data: the out-of-fold files of hemorrhage_extract_features.py (role "oof"). Head fold k trains on the
series of every other fold and validates on fold k's, whose features came from the CNN fold that did
not train on them either; the folds are the CNN training's (by study). Test-set files (role "test")
are not used.

Recipe (after the original ``SequenceModel/main.py``): per epoch every training series once, in random
order, as a crop of `crop` (24) consecutive slices; augmentation keeps every other slice (random
parity) and reverses the order, each with probability 0.5; loss = weighted BCE (class weights
[2,1,1,1,1,1]) of the logits plus that of the stage-1 logits, over REAL, LABELLED slices only (the
original also counted its padding); Adam 3e-4 and MultiStepLR. Validation reads whole series forwards
and backwards as inference does and scores the competition's weighted log loss next to that of the
CNN ensemble alone on the same slices. The best epoch is written as ``sequence_fold{k}.pth``
(`hemorrhage.models.sequence_checkpoint`), which hemorrhage_infer.py --sequence_weights loads; a folder
of several folds' files is averaged there.

Output folder: sequence_fold{k}.pth, train_log_{k}.jsonl (one line per epoch), sequence_config_{k}.yaml,
sequence_state_{k}.pt (model, optimizer, schedule, best so far, RNG and, after a stop signal, the position
in the epoch: what --resume reads; written after every epoch and on a stop).

Stopping (ctcore.preemption): on SIGTERM or SIGUSR1 the run finishes its current batch, writes
sequence_state_{k}.pt with the batches done and the epoch's losses so far, and returns with
`stopped_by: "signal"` (the script exits 75). --resume continues that epoch after those batches (the
order and crops are functions of seed, epoch and series) with the RNG as it was, so the result is that
of a run that did not stop. After the batch, not the epoch: reading every series' features file once
per epoch can take longer than the warning before the time limit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ctcore.atomic import atomic_write
from ctcore.cli import save_resolved
from ctcore.errors import UsageError
from ctcore.preemption import stop_on_signals
from ctcore.schema import arg
from hemorrhage.augment import rng_for, seed_for
from hemorrhage.ensemble import resolve_device
from hemorrhage.feature_files import FeaturesError, SeriesFeatures, load_features_dir, read_series_features
from hemorrhage.kaggle import LabelError, read_labels
from hemorrhage.metrics import weighted_log_loss
from hemorrhage.models.sequence import (
    SequenceConfig,
    SequenceModel,
    pad_studies,
    predict_both_directions,
    sequence_loss,
    slice_gaps,
)
from hemorrhage.models.sequence_checkpoint import Member, member_label, save_sequence_checkpoint

log = logging.getLogger(__name__)


@dataclass
class SequenceTrainConfig:
    features_dir: Path = arg(help="output folder of hemorrhage_extract_features.py")
    labels: Path = arg(help="RSNA-format labels (ID,Label)")
    output_dir: Path = arg()
    fold: int = arg(0, help="validation fold (the CNN training's folds)")
    epochs: int = 30
    batch_size: int = arg(32, help="series per step")
    lr: float = 3e-4
    weight_decay: float = 0.0
    milestones: list[int] = arg(default_factory=lambda: [20, 25], nargs="*", help="MultiStepLR epochs")
    gamma: float = arg(0.1, help="MultiStepLR factor")
    crop: int = arg(24, help="consecutive slices per training sample")
    every_other: float = arg(0.5, help="probability of keeping every other slice")
    reverse: float = arg(0.5, help="probability of reversing the slice order")
    rnn: str = arg("lstm", choices=("lstm", "gru"), help="lstm (default) or gru (the original's)")
    hidden: int = 96
    dropout: float = 0.5
    conv_width: int = 256
    use_slice_gap: bool = arg(False, help="the distance to the next slice as an extra input")
    device: str = "auto"
    num_workers: int = arg(0, help="DataLoader workers reading features")
    seed: int = 0
    progress: bool = arg(True, action="store_false")
    resume: bool = arg(False, help="continue from <output_dir>/sequence_state_<fold>.pt (written after every "
                                   "epoch and when a stop signal ends the run)")


@dataclass
class LabelledSeries:
    """A features file and the labels of its slices."""

    path: Path
    fold: int
    targets: np.ndarray  # (S, 6) float32, 0 where unlabelled
    labelled: np.ndarray  # (S,) bool


# ----------------------------------------------------------------------------------------- data


def series_sample(sf: SeriesFeatures, ls: LabelledSeries, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """The tensors of slices `idx` (in that order) of one series."""
    gaps = slice_gaps(sf.positions[idx].tolist())
    return {"features": sf.padded_features()[idx], "probs": sf.stacked_probs()[idx],
            "targets": torch.from_numpy(ls.targets[idx]), "labelled": torch.from_numpy(ls.labelled[idx]),
            "gap": torch.tensor(gaps, dtype=torch.float32)}


def augment_indices(n: int, rng: np.random.Generator, crop: int, every_other: float, reverse: float) -> np.ndarray:
    """Slice indices of one training sample: maybe every other slice, a crop of `crop`, maybe reversed."""
    idx = np.arange(n)
    if n >= 4 and rng.random() < every_other:
        idx = idx[int(rng.integers(2))::2]
    if len(idx) > crop:
        start = int(rng.integers(len(idx) - crop + 1))
        idx = idx[start:start + crop]
    if rng.random() < reverse:
        idx = idx[::-1]
    return idx.copy()


class SequenceSamples(Dataset):
    """Item (series index, epoch) -> one augmented crop; files are read when needed (workers scale it)."""

    def __init__(self, series: list[LabelledSeries], cfg: SequenceTrainConfig, train: bool) -> None:
        self.series, self.cfg, self.train = series, cfg, train

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        i, epoch = key
        ls = self.series[i]
        sf = read_series_features(ls.path)
        if self.train:
            rng = rng_for(self.cfg.seed, epoch, i)
            idx = augment_indices(sf.n_slices, rng, self.cfg.crop, self.cfg.every_other, self.cfg.reverse)
        else:
            idx = np.arange(sf.n_slices)
        return series_sample(sf, ls, idx)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad the series to the longest; `mask` marks real slices."""
    out = {}
    for key in ("features", "probs", "targets", "labelled", "gap"):
        out[key], mask = pad_studies([it[key] for it in items])
    out["mask"] = mask
    out["labelled"] = out["labelled"].bool() & mask
    return out


def label_series(files: list[SeriesFeatures], labels_path: Path) -> tuple[list[LabelledSeries], dict]:
    """Attach labels to the out-of-fold files; series without any labelled slice are counted and left out."""
    try:
        labels = read_labels(labels_path)
    except LabelError as e:
        raise UsageError(str(e)) from e
    out, unlabelled = [], []
    for sf in files:
        y = labels.reindex(sf.sop_uids).to_numpy(np.float32)
        labelled = ~np.isnan(y).any(1)
        if not labelled.any():
            unlabelled.append(sf.series_uid)
            continue
        out.append(LabelledSeries(sf.path, sf.fold, np.nan_to_num(y, nan=0.0), labelled))
    return out, {"series_without_labels": len(unlabelled), "examples": unlabelled[:5]}


def check_members(files: list[SeriesFeatures]) -> list[Member]:
    """The members every file was made with (the head's model axis); they must agree."""
    members = files[0].members
    odd = [sf for sf in files if sf.members != members]
    if odd:
        raise UsageError(f"{odd[0].path} holds members {[member_label(m) for m in odd[0].members]}, "
                         f"{files[0].path} {[member_label(m) for m in members]} ({len(odd)} files differ): "
                         "extract all features with the same --weights_dir and --models")
    return members

# ----------------------------------------------------------------------------------------- training


def _batches(ds: SequenceSamples, order: list[int], epoch: int, cfg: SequenceTrainConfig):
    keys = [(i, epoch) for i in order]  # the sampler hands these keys to ds[...] in the workers
    # the loader draws its workers' base seed from its own generator, not from torch's global one: the model
    # (dropout) is then the global RNG's only user, so a resume restores it once, wherever the run stopped
    # (the samples themselves are functions of seed, epoch and series: rng_for)
    seeds = torch.Generator().manual_seed(seed_for(cfg.seed, "loader", epoch))
    return DataLoader(ds, sampler=keys, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate,
                      generator=seeds)


def evaluate(model: SequenceModel, ds: SequenceSamples, cfg: SequenceTrainConfig, device: torch.device
             ) -> tuple[float, float, int]:
    """(head's weighted log loss, CNN ensemble mean's, labelled slices) over whole validation series."""
    model.eval()
    ys, ps, cs = [], [], []
    for b in _batches(ds, list(range(len(ds))), 0, cfg):
        gap = b["gap"].to(device) if cfg.use_slice_gap else None
        p = predict_both_directions(model, b["features"].to(device), b["probs"].to(device), b["mask"].to(device),
                                    gap).float().cpu()
        keep = b["labelled"]
        ys.append(b["targets"][keep].numpy())
        ps.append(p[keep].numpy())
        cs.append(b["probs"].mean(2)[keep].numpy())  # the CNN ensemble: mean over members
    y, p, c = np.concatenate(ys), np.concatenate(ps), np.concatenate(cs)
    return weighted_log_loss(y, p), weighted_log_loss(y, c), len(y)


def _training_series(cfg: SequenceTrainConfig) -> tuple[list, object, list, list, dict]:
    """The out-of-fold features of --features_dir, checked: (members, their inputs, training series,
    validation series of --fold, what labelling found)."""
    try:
        files = [sf for sf in load_features_dir(cfg.features_dir) if sf.role == "oof"]
    except FeaturesError as e:
        raise UsageError(str(e)) from e
    if not files:
        raise UsageError(f"{cfg.features_dir}: no out-of-fold features (role oof); extract them from the training "
                         "studies with the folds file of the CNN training")
    members = check_members(files)
    inputs = files[0].inputs
    if any(sf.inputs != inputs for sf in files):
        odd = next(sf for sf in files if sf.inputs != inputs)
        raise UsageError(f"{odd.path} was made with other inputs ({odd.inputs}) than {files[0].path} ({inputs})")
    series, label_info = label_series(files, cfg.labels)
    train = [s for s in series if s.fold != cfg.fold]
    val = [s for s in series if s.fold == cfg.fold]
    folds = sorted({s.fold for s in series})
    if not train or not val:
        raise UsageError(f"--fold {cfg.fold}: {len(train)} training and {len(val)} validation series; the "
                         f"features hold folds {folds}, and both sides need at least one labelled series")
    if label_info["series_without_labels"]:
        log.warning("%d series have no labelled slice and are left out (e.g. %s)",
                    label_info["series_without_labels"], label_info["examples"][0])
    return members, inputs, train, val, label_info


def run_sequence_training(cfg: SequenceTrainConfig) -> dict:
    t0 = time.perf_counter()
    members, inputs, train, val, label_info = _training_series(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = SequenceModel(SequenceConfig(num_models=len(members), rnn=cfg.rnn, hidden=cfg.hidden,
                                         dropout=cfg.dropout, conv_width=cfg.conv_width,
                                         use_slice_gap=cfg.use_slice_gap)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out / f"sequence_config_{cfg.fold}.yaml")
    log_path = out / f"train_log_{cfg.fold}.jsonl"
    ckpt = out / f"sequence_fold{cfg.fold}.pth"
    state_path = out / f"sequence_state_{cfg.fold}.pt"
    train_ds, val_ds = SequenceSamples(train, cfg, True), SequenceSamples(val, cfg, False)
    log.info("sequence head fold %d: %d training series, %d validation series, members %s", cfg.fold,
             len(train), len(val), [member_label(m) for m in members])
    best = {"epoch": -1, "val_loss": float("inf")}
    cnn_loss = float("nan")
    start, done, losses = 0, 0, []
    if cfg.resume and state_path.is_file():
        st = _load_state(state_path, model, opt, sched, device)
        start, done, losses = st["epoch"], st["batches_done"], list(st["losses"])
        best, cnn_loss = dict(st["best"]), st["cnn_loss"]
        torch.set_rng_state(st["rng"].cpu())  # as it was after batch `done` (dropout's only source)
    kept = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < start] \
        if start and log_path.is_file() else []
    log_path.write_text("".join(ln + "\n" for ln in kept))  # a fresh log, or the epochs before `start`

    def save_state(epoch: int, batches_done: int) -> None:
        """Where the run stands: `epoch` with `batches_done` of its batches done (0: from its start)."""
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "epoch": epoch, "batches_done": batches_done, "losses": list(losses), "best": best,
                 "cnn_loss": cnn_loss, "rng": torch.get_rng_state()}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    with stop_on_signals() as stop:
        for epoch in range(start, cfg.epochs):
            model.train()
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train)).tolist()
            for b in _batches(train_ds, order[done * cfg.batch_size:], epoch, cfg):
                done += 1
                if not bool(b["labelled"].any()):
                    continue
                gap = b["gap"].to(device) if cfg.use_slice_gap else None
                o = model(b["features"].to(device), b["probs"].to(device), b["mask"].to(device), gap)
                loss = sequence_loss(o, b["targets"].to(device), b["labelled"].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if stop.requested:  # one process: no ranks to agree with
                    log.warning("stop signal (%s): leaving after batch %d of epoch %d, saving %s", stop.name,
                                done, epoch, state_path)
                    save_state(epoch, done)
                    return {"stopped_by": "signal", "epoch": epoch, "batches_done": done,
                            "resume_state": str(state_path), "checkpoint": str(ckpt), "best_epoch": best["epoch"],
                            "best_val_loss": best["val_loss"], "cnn_val_loss": cnn_loss,
                            "train_series": len(train), "val_series": len(val),
                            "seconds": time.perf_counter() - t0}
            row, cnn_loss = _end_epoch(model, opt, sched, val_ds, cfg, device, epoch, losses, log_path)
            if row["val_weighted_log_loss"] < best["val_loss"]:
                best = {"epoch": epoch, "val_loss": row["val_weighted_log_loss"]}
                save_sequence_checkpoint(model.cpu(), ckpt, members, epoch, best["val_loss"], fold=cfg.fold,
                                         inputs=inputs)
                model.to(device)
            done, losses = 0, []
            save_state(epoch + 1, 0)
    return {"checkpoint": str(ckpt), "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
            "cnn_val_loss": cnn_loss, "train_series": len(train), "val_series": len(val),
            "members": [member_label(m) for m in members], "seconds": time.perf_counter() - t0, **label_info}


def _load_state(path: Path, model: SequenceModel, opt: torch.optim.Optimizer, sched, device: torch.device) -> dict:
    """Restore model, optimizer and schedule from a sequence_state file; the rest of it is returned."""
    try:
        st = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
    except Exception as e:  # truncated, foreign or from another head configuration
        raise UsageError(f"{path}: not a resume state of this head ({type(e).__name__}: {e}); move it away "
                         "to start over") from e
    log.info("resumed from %s: epoch %d after batch %d", path, st["epoch"], st["batches_done"])
    return st


def _end_epoch(model: SequenceModel, opt: torch.optim.Optimizer, sched, val_ds: SequenceSamples,
               cfg: SequenceTrainConfig, device: torch.device, epoch: int, losses: list[float],
               log_path: Path) -> tuple[dict, float]:
    """The schedule's step, validation and the epoch's log line: (the line, the CNN ensemble's loss)."""
    lr = opt.param_groups[0]["lr"]  # the epoch's own: after sched.step() it would be the next epoch's
    sched.step()
    val_loss, cnn_loss, n_val = evaluate(model, val_ds, cfg, device)
    row = {"epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses)),
           "val_weighted_log_loss": val_loss, "cnn_val_weighted_log_loss": cnn_loss, "val_slices": n_val}
    with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if cfg.progress:
        log.info("epoch %d: train %.4f, val %.4f (CNN alone %.4f)", epoch, row["train_loss"], val_loss, cnn_loss)
    return row, cnn_loss

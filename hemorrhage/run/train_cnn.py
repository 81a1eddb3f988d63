"""Train one 2D CNN of the ensemble on one fold (scripts/hemorrhage_train.py), as the original did.

    python scripts/hemorrhage_train.py --labels stage_2_train.csv --data_dir /data/dicoms \\
        --model se_resnext101_32x4d --fold 0 --output_dir runs/2DNet
    torchrun --nproc_per_node=4 scripts/hemorrhage_train.py --use_ddp --labels L --data_dir D --fold 1 ...

Layout of --output_dir (it doubles as the inference script's --weights_dir):

    folds.csv                               study -> fold, made once (seeded) and reused by every fold
    prepared/                               a DICOM --data_dir is prepared here once (npz stacks, resumable)
    <model>_<size>/model_epoch_best_{fold}.pth   best validation weighted log loss, ORIGINAL format
    <model>_<size>/model_epoch_{epoch}_{fold}.pth   every --save_every epochs, original format
    <model>_<size>/train_state_{fold}.pt    model + optimizer + scaler + epoch + best (+ the position in an
                                            epoch stopped by a signal) + RNG: what --resume reads
    <model>_<size>/train_log_{fold}.jsonl   one line per epoch; train_config_{fold}.yaml: the settings

Recipe (DESIGN 5): 4 x n_studies draws per epoch (`hemorrhage.train_data`), the original's augmentations
on uint8 in the workers, BCEWithLogits, Adam (5e-4, weight decay 2e-5), the learning rate constant for
10 epochs then cosine warm restarts (period 5 epochs, down to 1e-5), 80 epochs. Validation predicts every
slice of the held-out fold's series exactly as inference does (centre crop 0.8) and scores the
competition's weighted log loss. bf16 autocast on CUDA by default, fp16 with a GradScaler on request.
The augmentation is a preset of `hemorrhage.augment` (`augment`); unset, the model's own: the original's
for every published architecture, "light" for the test-only tiny_densenet.

Stopping (ctcore.preemption): on SIGTERM or SIGUSR1 every rank finishes its current batch (the flag is
agreed over the ranks after each one), rank 0 writes train_state_<fold>.pt with the position in the
epoch (batches done and the epoch's running loss sums) and the torch RNG, and the run returns with
`stopped_by: "signal"` (the script exits 75). --resume then skips the batches already trained on in
that epoch (the draws and their augmentation are functions of seed, epoch and draw, see
hemorrhage.train_data) and continues as if it had not stopped. After the batch, not after the epoch:
an epoch of the original recipe (4 draws x ~17k studies) takes far longer than the 90 s warning.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ctcore.atomic import atomic_write
from ctcore.cli import save_resolved
from ctcore.distributed import DistInfo, barrier, broadcast_object, init_distributed, is_initialized
from ctcore.errors import UsageError
from ctcore.precision import CHOICES as PRECISION_CHOICES
from ctcore.precision import autocast_factory
from ctcore.preemption import StopRequest, stop_on_signals
from ctcore.schema import arg
from hemorrhage.augment import AUGMENT_PRESETS, augment_preset, seed_for
from hemorrhage.inference_data import find_series, is_prepared_folder
from hemorrhage.kaggle import read_labels
from hemorrhage.metrics import weighted_log_loss
from hemorrhage.models.checkpoint import CHECKPOINT_NAME, save_original_checkpoint, weights_folder_name
from hemorrhage.models.cnn import build_cnn, cnn_spec, list_cnns, normalize_uint8
from hemorrhage.run.prepare import PrepareConfig, run_prepare  # a DICOM --data_dir: the prepare job is a step
from hemorrhage.run.train_cnn_validation import gather_arrays, predict_series_probs
from hemorrhage.series import resolve_workers
from hemorrhage.train_data import EpochDraws, TrainSeries, TrainSlices, load_or_make_folds

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    labels: Path = arg(help="RSNA-format labels CSV (ID,Label)")
    data_dir: Path = arg(help="DICOM tree or hemorrhage_prepare.py output")
    output_dir: Path = arg(help="run folder; also a --weights_dir for inference")
    model: str = arg("DenseNet121_change_avg",
                     help=f"architecture: {', '.join(list_cnns())} (tiny_densenet for tests)")
    fold: int = arg(0, help="held-out fold")
    n_folds: int = 5
    fold_seed: int = arg(0, help="seed of the study -> fold assignment (folds.csv)")
    epochs: int = 80
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 2e-5
    constant_epochs: int = arg(10, help="epochs at --lr before the warm restarts")  # then cosine warm restarts
    restart_period: int = arg(5, help="cosine warm restart period, epochs")
    min_lr: float = 1e-5
    input_size: int = 256
    samples_per_study: int = arg(4, help="draws per training study per epoch")
    max_draws: int | None = arg(None, help="cap on draws per epoch (quick runs)")
    window: str = arg("header", help="window used when preparing a DICOM --data_dir")
    # None = the model's own (CNNSpec.train_augment)
    augment: str | None = arg(None, choices=sorted(AUGMENT_PRESETS),
                              help="augmentation preset (default: the model's own: the original's for the "
                                   "published architectures, light for tiny_densenet)")
    precision: str = arg("auto", choices=PRECISION_CHOICES,
                         help="auto = bf16 on CUDA, fp32 on the CPU; bf16 | fp16 (CUDA) | fp32 (none, off)")
    device: str | None = arg(None, help="cpu, cuda (default: CUDA if available)")
    num_workers: int = arg(-1, flags=("-j",), help="DataLoader workers (-1 = all CPUs)")
    save_every: int = arg(5, help="also keep model_epoch_<epoch>_<fold>.pth every N")
    val_every: int = 1
    resume: bool = arg(False, help="continue from <model>_<size>/train_state_<fold>.pt")
    use_ddp: bool = arg(False, help="under torchrun or srun: one process per GPU")
    seed: int = 0
    progress: bool = arg(True, action="store_false")


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """The original's schedule as a function of the epoch (stateless, so resuming needs nothing else)."""
    if epoch < cfg.constant_epochs:
        return cfg.lr
    t = (epoch - cfg.constant_epochs) % cfg.restart_period
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / cfg.restart_period)) / 2


def resolve_augment(cfg: TrainConfig) -> str:
    """The augmentation preset of the run: `cfg.augment`, else the model's default; ValueError if unknown."""
    name = cfg.augment or cnn_spec(cfg.model).train_augment
    augment_preset(name)
    return name


def autocast_for(precision: str, device: torch.device):
    """(autocast context factory, GradScaler or None): ctcore.precision's, bad values as UsageError."""
    try:
        return autocast_factory(precision, device)
    except ValueError as e:
        raise UsageError(f"--precision: {e}") from None


# ----------------------------------------------------------------------------------------- data


def training_series(cfg: TrainConfig, dist_info: DistInfo) -> tuple[list[TrainSeries], dict]:
    """The labelled series of the data folder (a DICOM tree is prepared into output_dir/prepared first)."""
    try:
        labels = read_labels(cfg.labels)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    source = Path(cfg.data_dir)
    if not source.is_dir():
        raise UsageError(f"--data_dir {source}: no such folder")
    if not is_prepared_folder(source):
        prepared = Path(cfg.output_dir) / "prepared"
        if dist_info.rank == 0:
            summary = run_prepare(PrepareConfig(source, prepared, format="npz", window=cfg.window,
                                                num_workers=cfg.num_workers, progress=cfg.progress))
            log.info("%s", summary.line())
        barrier()
        source = prepared
    jobs, _ = find_series(source, progress=False)
    series, found = [], set()
    for job in jobs:
        y = labels.reindex(job.sop_uids).to_numpy(np.float32)  # NaN rows where the SOP has no label
        found.update(s for s in job.sop_uids if s in labels.index)
        series.append(TrainSeries(job, y))
    n_slices = sum(j.n_slices for j in jobs)
    report = {"source": str(source), "series": len(series), "slices": n_slices, "labelled_slices": len(found),
              "labels_without_image": int(len(labels) - len(found)),
              "labels_without_image_examples": sorted(set(labels.index) - found)[:10]}
    if report["labels_without_image"]:
        log.warning("%d labelled SOPs have no image in %s (e.g. %s)", report["labels_without_image"], source,
                    report["labels_without_image_examples"][:3])
    if not found:
        raise UsageError(f"no slice of {source} has a label in {cfg.labels}: do the SOPInstanceUIDs match?")
    return series, report


# ----------------------------------------------------------------------------------------- the run


@dataclass
class EpochProgress:
    """An epoch's batches so far (this rank's) and its running log sums: what a mid-epoch resume carries."""

    batches: int = 0
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0
    wait: float = 0.0



def _rng_states() -> dict[str, Any]:
    states = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(st: dict[str, Any]) -> None:
    if "rng" in st:  # states of older versions have none
        torch.set_rng_state(st["rng"].cpu())
    if "cuda_rng" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in st["cuda_rng"]])


def _save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler, epoch: int,
                best: float, best_epoch: int, in_epoch: tuple[int, EpochProgress] | None = None) -> None:
    """The resume state after epoch `epoch` (-1: none done); `in_epoch`: (epoch, progress) of an epoch
    stopped after a batch. Written whole or not at all (ctcore.atomic)."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else {}, "epoch": epoch, "best": best,
             "best_epoch": best_epoch, **_rng_states()}
    if in_epoch is not None:
        state["in_epoch"] = {"epoch": in_epoch[0], **asdict(in_epoch[1])}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def run_training(cfg: TrainConfig) -> dict:
    """Train `cfg.model` on every fold but `cfg.fold`; returns the final record (also in the log)."""
    if not 0 <= cfg.fold < cfg.n_folds:
        raise UsageError(f"--fold {cfg.fold}: expected 0..{cfg.n_folds - 1}")
    try:
        build_cnn(cfg.model)
        cfg = replace(cfg, augment=resolve_augment(cfg))  # so train_config_<fold>.yaml names the preset used
    except ValueError as e:
        raise UsageError(str(e)) from e
    info = init_distributed(cfg.use_ddp, cfg.device)
    try:
        return _train(cfg, info)
    finally:
        if cfg.use_ddp and is_initialized():
            torch.distributed.destroy_process_group()


def _fold_split(cfg: TrainConfig, info: DistInfo, series: list[TrainSeries]
                ) -> tuple[list[TrainSeries], list[TrainSeries]]:
    """(training, validation) series of `cfg.fold`; rank 0 reads or makes folds.csv, the others receive it."""
    folds = None
    if info.rank == 0:
        folds = load_or_make_folds(Path(cfg.output_dir) / "folds.csv", [s.job.study_uid for s in series],
                                   cfg.n_folds, cfg.fold_seed)
    folds = broadcast_object(folds)
    train = [s for s in series if folds[s.job.study_uid] != cfg.fold]
    val = [s for s in series if folds[s.job.study_uid] == cfg.fold]
    log.info("fold %d: %d train series (%d studies), %d validation series; augmentation %s", cfg.fold, len(train),
             len({s.job.study_uid for s in train}), len(val), cfg.augment)
    return train, val


def _resume(cfg: TrainConfig, state_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler,
            device: torch.device) -> tuple[int, float, int, EpochProgress]:
    """(first epoch, best score, its epoch, what of the first epoch is done): from `state_path` when
    resuming and it exists, else a fresh start."""
    if not (cfg.resume and state_path.is_file()):
        return 0, math.inf, -1, EpochProgress()
    try:
        st = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
    except Exception as e:  # truncated, foreign or from another model
        raise UsageError(f"{state_path}: not a resume state of this model ({type(e).__name__}: {e}); move it "
                         "away to start over") from e
    if scaler is not None and st["scaler"]:
        scaler.load_state_dict(st["scaler"])
    log.info("resumed from %s: epoch %d done, best %.5f (epoch %d)", state_path, st["epoch"], st["best"],
             st["best_epoch"])
    # as they were when the state was saved (after a batch, or after an epoch's validation): the training
    # loader draws from its own generator, so nothing between here and the next batch uses these
    _set_rng_states(st)
    if "in_epoch" in st:  # stopped by a signal after a batch: continue that epoch after it
        part = dict(st["in_epoch"])
        epoch = int(part.pop("epoch"))
        progress = EpochProgress(**part)
        log.info("epoch %d: continuing after batch %d", epoch, progress.batches)
        return epoch, st["best"], st["best_epoch"], progress
    return st["epoch"] + 1, st["best"], st["best_epoch"], EpochProgress()


def _train_epoch(ddp: torch.nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, autocast, scaler,
                 device: torch.device, world_size: int, done: EpochProgress, stop: StopRequest) -> dict | None:
    """The rest of one pass over `loader` (`done`: what a resumed epoch had done; updated as it goes): BCE
    on the logits, one optimiser step per batch; the epoch's log fields, or None when a stop signal
    (agreed over the ranks after every batch) ended it early."""
    ddp.train()
    t0, wait, n_img, loss_sum, n_batches = time.perf_counter(), done.wait, done.images, done.loss_sum, done.batches
    t = time.perf_counter()
    for x, y in loader:
        wait += time.perf_counter() - t
        x = normalize_uint8(x.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast():
            loss = F.binary_cross_entropy_with_logits(ddp(x).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        loss_sum += float(loss.detach())
        n_batches += 1
        n_img += len(x)
        t = time.perf_counter()
        if stop.agreed(device):  # every rank, every batch: all leave after the same one
            done.batches, done.loss_sum, done.images, done.wait = n_batches, loss_sum, n_img, wait
            done.seconds += time.perf_counter() - t0
            return None
    seconds = done.seconds + time.perf_counter() - t0
    return {"train_loss": loss_sum / max(n_batches, 1), "images": n_img * world_size, "seconds": round(seconds, 3),
            "images_per_s": round(n_img * world_size / max(seconds, 1e-9), 2),
            "data_wait_share": round(wait / max(seconds, 1e-9), 3)}


def _save_epoch(cfg: TrainConfig, member_dir: Path, record: dict, best: float, best_epoch: int,
                model: torch.nn.Module, opt: torch.optim.Optimizer, scaler, has_val: bool) -> tuple[float, int]:
    """Rank 0 after an epoch: best and periodic checkpoints, the resume state, one log line; the new best."""
    epoch, last = record["epoch"], record["epoch"] == cfg.epochs - 1
    score = record.get("val_weighted_log_loss", math.inf if has_val else record["train_loss"])
    if score < best:
        best, best_epoch = score, epoch
        save_original_checkpoint(model, member_dir / CHECKPOINT_NAME.format(fold=cfg.fold), epoch, best)
    if cfg.save_every and ((epoch + 1) % cfg.save_every == 0 or last):
        save_original_checkpoint(model, member_dir / f"model_epoch_{epoch}_{cfg.fold}.pth", epoch,
                                 record.get("val_weighted_log_loss", math.nan))
    _save_state(member_dir / f"train_state_{cfg.fold}.pt", model, opt, scaler, epoch, best, best_epoch)
    record.update(best_val_weighted_log_loss=best, best_epoch=best_epoch)
    with open(member_dir / f"train_log_{cfg.fold}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("epoch %d: %s", epoch, {k: v for k, v in record.items() if k != "epoch"})
    return best, best_epoch


def _train(cfg: TrainConfig, info: DistInfo) -> dict:
    member_dir = Path(cfg.output_dir) / weights_folder_name(cfg.model, cfg.input_size)
    series, data_report = training_series(cfg, info)
    train, val = _fold_split(cfg, info, series)
    if info.rank == 0:
        member_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, member_dir / f"train_config_{cfg.fold}.yaml")

    torch.manual_seed(cfg.seed)
    device = info.device
    model = build_cnn(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast, scaler = autocast_for(cfg.precision, device)
    state_path = member_dir / f"train_state_{cfg.fold}.pt"
    start, best, best_epoch, done = _resume(cfg, state_path, model, opt, scaler, device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model

    workers = resolve_workers(cfg.num_workers)
    sampler = EpochDraws(train, cfg.samples_per_study, cfg.seed, info.rank, info.world_size, cfg.max_draws)
    dataset = TrainSlices(train, cfg.input_size, cfg.seed, augment_preset(resolve_augment(cfg)))
    # the loader draws its workers' base seed from its own generator, reseeded every epoch, not from the
    # global RNG: a resume then restores the RNG once (_resume), wherever the run stopped
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False, generator=torch.Generator())
    with stop_on_signals() as stop:  # SIGTERM / SIGUSR1: leave after the current batch, resumable
        return _epochs(cfg, info, model, ddp, opt, autocast, scaler, sampler, loader, val, workers, member_dir,
                       state_path, data_report, start, best, best_epoch, done, stop)


def _epochs(cfg: TrainConfig, info: DistInfo, model, ddp, opt, autocast, scaler, sampler: EpochDraws,
            loader: DataLoader, val: list[TrainSeries], workers: int, member_dir: Path, state_path: Path,
            data_report: dict, start: int, best: float, best_epoch: int, done: EpochProgress,
            stop: StopRequest) -> dict:
    """Epochs `start`.. (the first one after `done`'s batches); the last record, or the stop record."""
    device = info.device
    record: dict = {"data": data_report}
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch, done.batches * cfg.batch_size)
        loader.generator.manual_seed(seed_for(cfg.seed, "loader", epoch))
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        fields = _train_epoch(ddp, loader, opt, autocast, scaler, device, info.world_size, done, stop)
        if fields is None:
            log.warning("stop signal (%s): leaving after batch %d of epoch %d, saving %s",
                        stop.name or "another rank's", done.batches, epoch, state_path)
            if info.rank == 0:
                _save_state(state_path, model, opt, scaler, epoch - 1, best, best_epoch, (epoch, done))
            barrier()
            return {"epoch": epoch, "batches_done": done.batches, "stopped_by": "signal", "data": data_report,
                    "best_val_weighted_log_loss": best, "best_epoch": best_epoch, "resume_state": str(state_path),
                    "checkpoint": str(member_dir / CHECKPOINT_NAME.format(fold=cfg.fold))}
        done = EpochProgress()
        record = {"epoch": epoch, "lr": lr_at(epoch, cfg), **fields}
        if val and ((epoch + 1) % cfg.val_every == 0 or epoch == cfg.epochs - 1):
            y, p = predict_series_probs(model, val[info.rank::info.world_size], cfg.input_size, device, autocast,
                                        cfg.batch_size, workers)
            y, p = gather_arrays(y, p)
            record["val_weighted_log_loss"] = float(weighted_log_loss(y, p))
            record["val_slices"] = len(y)
        if info.rank == 0:
            best, best_epoch = _save_epoch(cfg, member_dir, record, best, best_epoch, model, opt, scaler, bool(val))
        barrier()
    record["data"] = data_report
    record["checkpoint"] = str(member_dir / CHECKPOINT_NAME.format(fold=cfg.fold))
    return record

"""Contrastive training of the 3D CLIP model on one process or many (torchrun / SLURM, DDP).

    python scripts/ctclip_train.py --ct_filepath data/train_volumes.h5 --txt_filepath data/train_reports.csv
    torchrun --nproc_per_node=4 scripts/ctclip_train.py --use_ddp ...

`--batch_size` is the GLOBAL batch of one optimizer step. It is split into `--grad_accum`
micro-batches and each of those across the processes; features of the accumulated micro-batches are
cached so that every step's loss sees all the negatives of the global batch. With the data order of
`GlobalBatchSampler`, a step sees the same samples for any number of processes, so results do not
depend on how many processes ran them.

The loop (`_train`): `_setup` builds everything (after train_checks.py says the run can start),
`global_steps` hands out each optimizer step with its micro-batches, `train_step` (train_step.py)
takes it, `stop_reason` (train_state.py) is the one place that ends a run, and `_after_step` logs,
validates and saves. SIGTERM / SIGUSR1 (ctcore.preemption) end the run after the current step with
reason "signal": latest.pt is saved and scripts/ctclip_train.py exits with EXIT_PREEMPTED (75).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ctclip.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ctclip.data.dataset import CTLabelDataset, CTReportDataset, collate_volumes, make_loader
from ctclip.feature_cache import (
    CachedReportDataset,
    FeatureCache,
    build_feature_cache,
    cache_dir,
    cache_key,
)
from ctclip.models.clip3d import param_groups
from ctclip.models.config import ModelConfig
from ctclip.models.factory import create_model as build_model
from ctclip.run.train_checks import SetupError, check_inputs, check_resume, check_stores
from ctclip.run.train_state import TrainState, global_steps, stop_reason
from ctclip.run.train_step import Learner, SliceSubset, TextView, TrainingStep, train_step
from ctclip.run.train_utils import (
    BudgetClock,
    GlobalBatchSampler,
    RunLog,
    Throughput,
    cosine_with_warmup,
    max_memory_mb,
)
from ctclip.zeroshot import (
    auroc_per_finding,
    encode_loader,
    load_templates,
    mean_defined,
    prompt_features,
    zero_shot_margins,
)
from ctcore.cli import resolved, save_resolved
from ctcore.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from ctcore.precision import CHOICES as PRECISION_CHOICES
from ctcore.precision import autocast_factory
from ctcore.preemption import stop_on_signals
from ctcore.schema import arg

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    ct_filepath: Path = arg(help="HDF5 store of training volumes (ctclip_preprocess.py)")
    txt_filepath: Path = arg(help="CT-RATE reports CSV")
    output_dir: Path = Path("runs/ctclip")
    # the architecture: ctclip.models.factory.ModelChoice's flags resolve it
    model: ModelConfig = arg(default_factory=ModelConfig, cli=False)
    batch_size: int = arg(32, help="global batch per optimizer step")
    epochs: int = 40
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup_steps: int = 500
    grad_accum: int = arg(1, help="micro-batches per step; negatives still span the whole batch")
    grad_clip: float = 1.0
    precision: str = arg("bf16", choices=PRECISION_CHOICES,
                         help="autocast: bf16 | fp16 (CUDA, with a GradScaler) | fp32 (none, off) | auto (bf16 on "
                              "CUDA, fp32 on CPU)")
    num_workers: int = 4
    seed: int = 42
    save_interval: int = arg(1000, help="steps between latest.pt checkpoints")
    log_interval: int = 10
    resume: str | None = arg(None, help="a checkpoint path, or 'latest' (<output_dir>/latest.pt when present)")
    text_column: str = arg("findings_impressions",
                           help="reports | findings | impressions | findings_impressions, or a CT-RATE column name")
    # < 1: each draw of a report keeps each sentence with this probability
    sentence_keep: float = arg(1.0, help="text augmentation: each time a report is drawn, keep each of its "
                                         "sentences with this probability (at least one); 1 = whole reports (seed "
                                         "behaviour). Helps a text tower trained from scratch")
    single_sentence_rate: float = arg(0.0, help="text augmentation: the share of report draws that show one "
                                                "sentence of the report, chosen at random (prompt-sized texts)")
    slice_keep: float = arg(1.0, help="each training step encodes this share of each volume's slices, evenly "
                                      "spaced from a random start (the same for the batch; the fusion sees them at "
                                      "their places in the volume; about that share of the slice encoder's cost); "
                                      "evaluation and validation read every slice (1 = all)")
    volume_shift: int = arg(0, help="image augmentation: each time a volume is drawn, move it by up to this many "
                                    "voxels in the axial plane (edges filled with air; 0 = none)")
    text_view_weight: float = arg(0.0, help="weight of a text-to-text contrastive term: each report of the batch "
                                            "against a second view of it (each of its drawn sentences kept with "
                                            "probability --text_view_keep), the other reports as negatives; makes a "
                                            "text tower trained from scratch read every sentence (0 = off)")
    text_view_keep: float = arg(0.6, help="sentence keep probability of the second text view (--text_view_weight)")
    sentence_weight: float = arg(0.0, help="weight of a sentence-image term: each sentence of the batch's reports "
                                           "against the batch's volumes, its targets the volumes whose report holds "
                                           "the same sentence (text_pool sentence; 0 = off)")
    sentence_match_cos: float = arg(0.0, help="with --sentence_weight: a sentence's targets are also the volumes "
                                              "whose report holds a sentence at least this cosine-similar to it "
                                              "(text tower embeddings; 0 = identical sentences only)")
    cache_features: bool = arg(False, help="with --freeze_dinov2: compute slice embeddings once")
    max_steps: int | None = arg(None, help="train for this many optimizer steps (sets the schedule)")
    # leave after this step (saving latest.pt), keeping the full run's schedule
    stop_at_step: int | None = arg(None, help="leave after this step, saving latest.pt, with the schedule of the "
                                              "full run (time-limited jobs; resume later)")
    # training budget: stop (saving latest.pt) once this much is used
    max_minutes: float | None = arg(None, help="training budget in minutes of --budget_clock: stop there (saving "
                                               "latest.pt; validation not counted); the cosine schedule follows "
                                               "the budget, so the run ends at a low learning rate")
    # cpu: process CPU time (user+sys, all threads) | wall (see BudgetClock)
    budget_clock: str = arg("cpu", choices=["cpu", "wall"],
                            help="cpu: CPU time of this process, user+sys over all its threads (use --num_workers "
                                 "0); wall: elapsed time")
    do_validate: bool = arg(False, help="zero-shot AUROC on the validation labels every --valid_interval")
    valid_interval: int = 200
    # zero-shot prompts of the validation: a preset or a file (ctclip.zeroshot)
    val_templates: str = arg("ctclip", help="zero-shot prompts of the validation: a preset (ctclip, seed, "
                                            "ensemble) or a template file (as ctclip_eval.py)")
    val_ct_filepath: Path | None = None
    val_label_path: Path | None = None
    use_ddp: bool = arg(False, help="distributed data parallel (run under torchrun or srun)")
    device: str | None = arg(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


@dataclass
class _Run:
    """What the loop works with, made once by `_setup`."""

    cfg: TrainConfig
    dist: DistInfo
    learner: Learner
    sampler: GlobalBatchSampler
    loader: DataLoader
    clock: BudgetClock
    runlog: RunLog
    bar: tqdm
    total_steps: int  # --max_steps, or --epochs of the sampler's steps
    store_shape: list[int]  # recorded in checkpoints: a resume must train on the same kind of store
    store_layout: str
    meter: Throughput = field(default_factory=Throughput)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def train(cfg: TrainConfig) -> dict[str, Any]:
    dist = init_distributed(cfg.use_ddp, cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        cleanup_distributed(dist)


def _train(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    """The loop: one optimizer step per global batch until `stop_reason` names why not. Returns the summary."""
    with stop_on_signals() as stop:  # SIGTERM / SIGUSR1: finish the step, save latest.pt, stop ("signal")
        run, state = _setup(cfg, dist)
        reason = stop_reason(state, cfg, run.clock, run.total_steps)
        batches = global_steps(run.loader, run.sampler, state, cfg.grad_accum)
        while reason is None:
            batch = next(batches)
            state.last_loss = train_step(run.learner, batch.micro)
            state.step, state.epoch, state.step_in_epoch = batch.step, batch.epoch, batch.step_in_epoch
            run.meter.add(cfg.batch_size)
            run.bar.update(1)
            if cfg.max_minutes is not None and dist.distributed:
                run.clock.share(broadcast_object)  # rank 0's reading: every rank stops at the same step
            signalled = stop.agreed(dist.device)  # any rank's signal, on every rank: all stop after this step
            reason = stop_reason(state, cfg, run.clock, run.total_steps, signalled)
            if reason == "signal":
                log.warning("stop signal (%s): leaving after step %d, saving %s", stop.name or "another rank's",
                            state.step, run.out / "latest.pt")
            _after_step(run, state, reason)
        batches.close()
    run.bar.close()
    summary: dict[str, Any] = {"steps": state.step, "best_metric": state.best_metric, "stopped_by": reason}
    if state.last_loss is not None:
        summary["last_loss"] = state.last_loss
    summary.update(_clock_fields(run.clock))
    run.runlog.close()
    return summary


def _after_step(run: _Run, state: TrainState, reason: str | None) -> None:
    """Log, validate and save at their intervals, and after the last step (`reason` given)."""
    cfg, last = run.cfg, reason is not None
    if state.step % cfg.log_interval == 0 or last:
        run.runlog.write(_train_record(run, state, reason))
        run.bar.set_postfix(loss=f"{state.last_loss:.4f}")
    # the last step is validated too, so that a budget-limited run's final model is scored; not on a stop
    # signal: the run is not over, and the time before SIGKILL is short
    if cfg.do_validate and (state.step % cfg.valid_interval == 0 or (last and reason != "signal")):
        _validate_and_keep_best(run, state)
    if state.step % cfg.save_interval == 0 or last:
        if run.dist.is_main:
            _save(run, state, "latest.pt")
        barrier()


def _train_record(run: _Run, state: TrainState, reason: str | None) -> dict[str, Any]:
    learner = run.learner
    temperature = float(1.0 / learner.model.temperature_scale().detach())
    return {"kind": "train", "step": state.step, "epoch": state.epoch, "loss": state.last_loss,
            "lr": learner.scheduler.get_last_lr()[0], "temperature": temperature,
            "volumes_per_s": run.meter.rate(), "max_memory_mb": max_memory_mb(run.dist.device),
            **_clock_fields(run.clock), **({"stopped_by": reason} if reason is not None else {})}


def _clock_fields(clock: BudgetClock) -> dict[str, float]:
    """Time spent so far: the budget's clock (validation excluded) and this process's CPU and wall
    time (validation included), in minutes."""
    return {"budget_minutes": clock.used() / 60.0, "cpu_minutes": clock.cpu_minutes(),
            "wall_minutes": clock.wall_minutes()}


def _validate_and_keep_best(run: _Run, state: TrainState) -> None:
    at = _clock_fields(run.clock)
    with run.clock.paused():  # validation is not training: it does not use up the budget
        metric = _validate(run, state, at)
    if run.dist.is_main and metric > state.best_metric:
        state.best_metric = metric
        _save(run, state, "best.pt")
    state.best_metric = broadcast_object(state.best_metric)


def _validate(run: _Run, state: TrainState, at: dict[str, float]) -> float:
    """Zero-shot mean AUROC on the validation labels (rank 0 computes; the others wait)."""
    cfg, dist, model = run.cfg, run.dist, run.learner.model
    metric = float("nan")
    if dist.is_main:
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        val = CTLabelDataset(cfg.val_ct_filepath, cfg.val_label_path)
        loader = make_loader(val, batch_size=run.sampler.rank_batch, num_workers=min(cfg.num_workers, 2))
        feats, labels = encode_loader(model, loader, dist.device, run.learner.autocast)
        templates = load_templates(cfg.val_templates)
        prompts = prompt_features(model, templates=templates, device=dist.device)
        margins = zero_shot_margins(feats, prompts, templates.scale(float(model.temperature_scale().detach())))
        aurocs = auroc_per_finding(labels, margins)  # ranked by the margin: no ties from saturated softmax
        metric = mean_defined(aurocs)
        run.runlog.write({"kind": "valid", "step": state.step, "epoch": state.epoch, "mean_auroc": metric,
                          "n_volumes": len(val), "seconds": time.perf_counter() - t0, **at,
                          **{f"auroc/{k}": v for k, v in aurocs.items() if not math.isnan(v)}})
        model.train(was_training)
    barrier()
    return metric


def _save(run: _Run, state: TrainState, name: str) -> None:
    save_checkpoint(run.out / name, {
        **run.learner.state_dicts(), **state.checkpoint_fields(), "rng": rng_state(), "config": resolved(run.cfg),
        "model_config": asdict(run.cfg.model), "store_shape": run.store_shape, "store_layout": run.store_layout,
        "budget_used_s": run.clock.used(),
    })


def _setup(cfg: TrainConfig, dist: DistInfo) -> tuple[_Run, TrainState]:
    """Data, checks, model, optimizer and, with --resume, the checkpoint's state: everything but a step."""
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    data = CTReportDataset(cfg.ct_filepath, cfg.txt_filepath, cfg.text_column, sentence_keep=cfg.sentence_keep,
                           seed=cfg.seed, volume_shift=cfg.volume_shift,
                           single_sentence_rate=cfg.single_sentence_rate)
    check_inputs(cfg, data)
    store_shape, store_layout = check_stores(cfg)
    resume_path = resolve_resume(cfg.resume, out)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    # started before the model is built: building it and the feature cache is part of the budget
    clock = BudgetClock(cfg.max_minutes, cfg.budget_clock, used=float(ckpt.get("budget_used_s", 0.0)) if ckpt else 0.0)
    if ckpt is not None:
        check_resume(cfg, ckpt, resume_path, store_shape, store_layout)

    model = build_model(cfg.model).to(dist.device)
    if ckpt is not None:
        load_model_state(model, ckpt["model"], resume_path)
    autocast, scaler = autocast_factory(cfg.precision, dist.device)
    sampler = GlobalBatchSampler(len(data), cfg.batch_size, cfg.grad_accum, dist.world_size, dist.rank, cfg.seed)
    if cfg.cache_features:
        loader = _cached_loader(cfg, model, data, dist, autocast, sampler)
    else:
        loader = DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_volumes,
                            pin_memory=dist.device.type == "cuda", persistent_workers=False)
    total_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    schedule = cosine_with_warmup(cfg.warmup_steps, total_steps,
                                  clock.progress if cfg.max_minutes is not None else None)
    learner = _learner(cfg, dist, model, autocast, scaler, schedule)
    state = _resume(learner, ckpt, resume_path) if ckpt is not None else TrainState()

    runlog = RunLog(out, dist.is_main)
    if dist.is_main:
        save_resolved(cfg, out / "config.yaml")
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not dist.is_main)
    return _Run(cfg, dist, learner, sampler, loader, clock, runlog, bar, total_steps, store_shape, store_layout), state


def _learner(cfg: TrainConfig, dist: DistInfo, model: nn.Module, autocast, scaler, schedule) -> Learner:
    step_module: nn.Module = TrainingStep(model, from_slices=cfg.cache_features)
    if dist.distributed:
        step_module = DistributedDataParallel(step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Learner(model=model, step_module=step_module, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   autocast=autocast, device=dist.device, grad_clip=cfg.grad_clip, distributed=dist.distributed,
                   text_view=TextView(cfg.text_view_weight, cfg.text_view_keep, cfg.seed, dist.rank)
                   if cfg.text_view_weight else None, sentence_weight=cfg.sentence_weight,
                   sentence_match_cos=cfg.sentence_match_cos,
                   slice_subset=SliceSubset(cfg.slice_keep, cfg.seed, dist.rank) if cfg.slice_keep < 1 else None)


def _resume(learner: Learner, ckpt: dict[str, Any], path: Path) -> TrainState:
    """Optimizer, schedule, RNG and loop position of a checkpoint (its weights are in the model already)."""
    learner.load_state_dicts(ckpt)
    state = TrainState.from_checkpoint(ckpt)
    set_rng_state(ckpt["rng"])
    log.info("resumed from %s at step %d (epoch %d, step %d of it)", path, state.step, state.epoch,
             state.step_in_epoch)
    return state


def _cached_loader(cfg: TrainConfig, model: nn.Module, data: CTReportDataset, dist: DistInfo, autocast,
                   sampler: GlobalBatchSampler) -> DataLoader:
    """Training on cached slice embeddings of the frozen encoder (computed first when missing)."""
    folder = cache_dir(Path(cfg.ct_filepath), cache_key(model, Path(cfg.ct_filepath)))
    n = build_feature_cache(model, data, folder, dist.rank, dist.world_size, dist.device,
                            batch_size=sampler.rank_batch, num_workers=cfg.num_workers, autocast=autocast,
                            barrier=barrier)
    log.info("feature cache %s: encoded %d volumes on this rank", folder, n)
    cached = CachedReportDataset(data, FeatureCache(folder))
    return DataLoader(cached, batch_sampler=sampler, num_workers=cfg.num_workers)


__all__ = ["TrainConfig", "train", "SetupError", "CheckpointError", "TrainingStep"]

"""Contrastive training of the 3D CLIP model on one process or many (torchrun / SLURM, DDP).

    python scripts/ctclip_train.py --ct_filepath data/train_volumes.h5 --txt_filepath data/train_reports.csv
    torchrun --nproc_per_node=4 scripts/ctclip_train.py --use_ddp ...

`--batch_size` is the GLOBAL batch of one optimizer step. It is split into `--grad_accum`
micro-batches and each of those across the processes; features of the accumulated micro-batches are
cached so that every step's loss sees all the negatives of the global batch. With the data order of
`GlobalBatchSampler`, a step sees the same samples for any number of processes, so results do not
depend on how many processes ran them.
"""

from __future__ import annotations

import contextlib
import functools
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
    check_model_config,
    load_checkpoint,
    load_model_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ctclip.data.dataset import CTLabelDataset, CTReportDataset, collate_volumes, make_loader
from ctclip.data.preprocess import check_layout
from ctclip.data.store import VolumeStore
from ctclip.feature_cache import (
    CachedReportDataset,
    FeatureCache,
    build_feature_cache,
    cache_dir,
    cache_key,
)
from ctclip.losses import ClipLoss, contrastive_loss_with_cached
from ctclip.models.clip3d import param_groups
from ctclip.models.registry import ModelConfig, build_model
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
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from ctcore.errors import UsageError
from ctcore.precision import autocast_factory

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    ct_filepath: Path
    txt_filepath: Path
    output_dir: Path = Path("runs/ctclip")
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 32
    epochs: int = 40
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup_steps: int = 500
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "bf16"
    num_workers: int = 4
    seed: int = 42
    save_interval: int = 1000
    log_interval: int = 10
    resume: str | None = None
    text_column: str = "findings_impressions"
    sentence_keep: float = 1.0  # < 1: each draw of a report keeps each sentence with this probability
    cache_features: bool = False
    max_steps: int | None = None
    stop_at_step: int | None = None  # leave after this step (saving latest.pt), keeping the full run's schedule
    max_minutes: float | None = None  # training budget: stop (saving latest.pt) once this much is used
    budget_clock: str = "cpu"  # cpu: process CPU time (user+sys, all threads) | wall (see BudgetClock)
    do_validate: bool = False
    valid_interval: int = 200
    val_templates: str = "ctclip"  # zero-shot prompts of the validation: a preset or a file (ctclip.zeroshot)
    val_ct_filepath: Path | None = None
    val_label_path: Path | None = None
    use_ddp: bool = False
    device: str | None = None


class TrainingStep(nn.Module):
    """What DDP wraps: one forward for volumes (or cached slice embeddings) and report tokens, so
    gradient synchronisation sees every parameter use through DDP's own forward."""

    def __init__(self, model: nn.Module, from_slices: bool):
        super().__init__()
        self.model, self.from_slices = model, from_slices

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        v = m.encode_volume_from_slices(inputs) if self.from_slices else m.encode_volume(inputs)
        return v, m.encode_text(tokens), m.temperature_scale()


class SetupError(UsageError):
    """The run cannot start; raised before any training step, with a message naming the problem."""


def _check_inputs(cfg: TrainConfig, data: CTReportDataset) -> None:
    if data.n_without_volume:
        log.warning("%d report rows of %s have no volume in %s and are not used", data.n_without_volume,
                    cfg.txt_filepath, cfg.ct_filepath)
    if data.n_empty_text == len(data):
        raise SetupError(f"every report in {cfg.txt_filepath} is empty for --text_column {cfg.text_column}")
    if data.n_empty_text:
        log.warning("%d of %d training reports have an empty %s", data.n_empty_text, len(data), cfg.text_column)
    if cfg.do_validate and (cfg.val_ct_filepath is None or cfg.val_label_path is None):
        raise SetupError("--do_validate needs --val_ct_filepath and --val_label_path")
    if cfg.cache_features and not cfg.model.freeze_dinov2:
        raise SetupError("--cache_features needs --freeze_dinov2 (a trained backbone changes its features)")
    if cfg.do_validate:
        try:
            load_templates(cfg.val_templates)
        except ValueError as e:
            raise SetupError(str(e).replace("--templates", "--val_templates")) from e
    _warn_truncation(cfg, data)


def _warn_truncation(cfg: TrainConfig, data: CTReportDataset, sample: int = 2000) -> None:
    """Reports longer than the text context are cut: whatever comes after the cut (with
    findings_impressions, the whole impression) never reaches the text tower. Checked on a sample."""
    from ctclip.models.text import get_tokenizer

    tok = get_tokenizer(cfg.model.context_length)
    texts = data.texts[:: max(1, len(data.texts) // sample)]
    lengths = [len(tok.encode(t)) + 2 for t in texts]  # + start and end of text
    cut = sum(n > cfg.model.context_length for n in lengths)
    if cut:
        log.warning("%d of %d sampled reports (%s) are longer than the context length %d tokens (longest %d) "
                    "and are truncated; see --context_length / --text_column", cut, len(texts), cfg.text_column,
                    cfg.model.context_length, max(lengths))


def _store_facts(path: Path) -> tuple[list[int], str]:
    """The volume shape and the stored layout (axis codes) of a store."""
    with VolumeStore(path) as s:
        return [int(x) for x in s.file_attrs()["target_shape"]], s.axis_codes()


def train(cfg: TrainConfig) -> dict[str, Any]:
    dist = init_distributed(cfg.use_ddp, cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        cleanup_distributed(dist)


def _train(cfg: TrainConfig, dist: DistInfo) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    data = CTReportDataset(cfg.ct_filepath, cfg.txt_filepath, cfg.text_column, sentence_keep=cfg.sentence_keep,
                           seed=cfg.seed)
    _check_inputs(cfg, data)
    store_shape, store_layout = _store_facts(Path(cfg.ct_filepath))
    if cfg.do_validate:
        problem = check_layout(str(cfg.val_ct_filepath), _store_facts(Path(cfg.val_ct_filepath))[1],
                               f"this run (training store {cfg.ct_filepath})", store_layout)
        if problem:
            raise SetupError(problem.replace("was trained on", "trains on"))
    resume_path = resolve_resume(cfg.resume, out)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    # started before the model is built: building it and the feature cache is part of the budget
    clock = BudgetClock(cfg.max_minutes, cfg.budget_clock, used=float(ckpt.get("budget_used_s", 0.0)) if ckpt else 0.0)
    if ckpt is not None:
        check_model_config(ckpt["model_config"], asdict(cfg.model), resume_path)
        if ckpt["store_shape"] != store_shape:
            raise SetupError(f"{cfg.ct_filepath} holds volumes of shape {store_shape}, but {resume_path} was "
                             f"trained on {ckpt['store_shape']}")
        problem = check_layout(str(cfg.ct_filepath), store_layout, str(resume_path), ckpt.get("store_layout"))
        if problem:
            raise SetupError(problem)

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
    step_module: nn.Module = TrainingStep(model, from_slices=cfg.cache_features)
    if dist.distributed:
        step_module = DistributedDataParallel(step_module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    total_steps = cfg.max_steps or cfg.epochs * sampler.steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        cfg.warmup_steps, total_steps, clock.progress if cfg.max_minutes is not None else None))
    step = epoch = start_in_epoch = 0
    best = float("-inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, start_in_epoch, best = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"], ckpt["best_metric"]
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", resume_path, step, epoch, start_in_epoch)

    runlog = RunLog(out, dist.is_main)
    if dist.is_main:
        save_resolved(cfg, out / "config.yaml")
    loss_fn = ClipLoss()
    meter = Throughput()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not dist.is_main)
    summary: dict[str, Any] = {"steps": step, "best_metric": best, "stopped_by": "steps"}
    stopping = False
    save = functools.partial(_save, cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                             store_shape=store_shape, store_layout=store_layout, clock=clock)
    while step < total_steps and not stopping:
        sampler.set_epoch(epoch, start_in_epoch)
        loader.dataset.set_epoch(epoch)  # before the workers start: they copy the dataset
        micro: list = []
        step_in_epoch = start_in_epoch
        for inputs, texts in loader:
            micro.append((inputs, model.tokenize(list(texts))))
            if len(micro) < cfg.grad_accum:
                continue
            loss = _optimizer_step(step_module, micro, loss_fn, optimizer, scheduler, scaler, autocast, cfg, dist)
            micro = []
            step += 1
            step_in_epoch += 1
            meter.add(cfg.batch_size)
            bar.update(1)
            if cfg.max_minutes is not None and dist.distributed:
                clock.share(broadcast_object)
            over_budget = clock.exhausted()
            stopping = over_budget or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
            if over_budget:
                summary["stopped_by"] = "budget"
            elif stopping:
                summary["stopped_by"] = "stop_at_step"
            summary.update(steps=step, last_loss=loss)
            last = stopping or step >= total_steps
            if step % cfg.log_interval == 0 or last:
                temperature = float(1.0 / model.temperature_scale().detach())
                runlog.write({"kind": "train", "step": step, "epoch": epoch, "loss": loss,
                              "lr": scheduler.get_last_lr()[0], "temperature": temperature,
                              "volumes_per_s": meter.rate(), "max_memory_mb": max_memory_mb(dist.device),
                              **_clock_fields(clock), **({"stopped_by": summary["stopped_by"]} if last else {})})
                bar.set_postfix(loss=f"{loss:.4f}")
            # the last step is validated too, so that a budget-limited run's final model is scored
            if cfg.do_validate and (step % cfg.valid_interval == 0 or last):
                at = _clock_fields(clock)
                with clock.paused():  # validation is not training: it does not use up the budget
                    metric = _validate(cfg, model, dist, autocast, runlog, step, epoch, at)
                if dist.is_main and metric > best:
                    best = metric
                    save(out / "best.pt", step=step, epoch=epoch, step_in_epoch=step_in_epoch, best=best)
                best = broadcast_object(best)
                summary["best_metric"] = best
            if step % cfg.save_interval == 0 or last:
                if dist.is_main:
                    save(out / "latest.pt", step=step, epoch=epoch, step_in_epoch=step_in_epoch, best=best)
                barrier()
            if step >= total_steps or stopping:
                break
        else:
            epoch += 1
            start_in_epoch = 0
            continue
        break  # max_steps, stop_at_step or the budget reached inside the epoch
    bar.close()
    summary.update(_clock_fields(clock))
    runlog.close()
    return summary


def _clock_fields(clock: BudgetClock) -> dict[str, float]:
    """Time spent so far: the budget's clock (validation excluded) and this process's CPU and wall
    time (validation included), in minutes."""
    return {"budget_minutes": clock.used() / 60.0, "cpu_minutes": clock.cpu_minutes(),
            "wall_minutes": clock.wall_minutes()}


def _optimizer_step(step_module, micro, loss_fn, optimizer, scheduler, scaler, autocast, cfg, dist) -> float:
    """One optimizer step over `micro` (grad_accum micro-batches of this rank). Returns the loss of
    the global batch."""
    optimizer.zero_grad(set_to_none=True)
    device = dist.device
    if len(micro) == 1:
        inputs, tokens = micro[0]
        with autocast():
            v, t, scale = step_module(inputs.to(device, non_blocking=True), tokens.to(device))
            loss = loss_fn(v.float(), t.float(), scale.float())
        _backward(loss, scaler)
        value = float(loss.detach())
    else:
        value = _accumulated_backward(step_module, micro, autocast, scaler, device)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return value if not dist.distributed else float(_mean_over_ranks(value, device))


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    return float(all_reduce_mean(torch.tensor([value], device=device, dtype=torch.float64)))


def _accumulated_backward(step_module, micro, autocast, scaler, device) -> float:
    """Gradient accumulation that keeps the global negatives: embed every micro-batch without
    gradient, then recompute each with gradient; `contrastive_loss_with_cached` puts it in its slot
    among the cached embeddings of all micro-batches of all ranks. Every call's value is the loss of
    the whole global batch (reported once); the gradients add up to the full-batch gradient."""
    cached_v, cached_t = [], []
    with torch.no_grad():
        for inputs, tokens in micro:
            with autocast():
                v, t, _ = step_module(inputs.to(device, non_blocking=True), tokens.to(device))
            cached_v.append(v.float())
            cached_t.append(t.float())
    ddp = isinstance(step_module, DistributedDataParallel)
    value = float("nan")
    for i, (inputs, tokens) in enumerate(micro):
        last = i == len(micro) - 1
        with (step_module.no_sync() if ddp and not last else contextlib.nullcontext()):
            with autocast():
                v, t, scale = step_module(inputs.to(device, non_blocking=True), tokens.to(device))
            loss = contrastive_loss_with_cached(v.float(), t.float(), cached_v, cached_t, i, scale.float())
            _backward(loss, scaler)
        if i == 0:
            value = float(loss.detach())
    return value


def _save(path, *, cfg, model, optimizer, scheduler, scaler, step, epoch, step_in_epoch, best, store_shape, store_layout,
          clock) -> None:
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "step": step, "epoch": epoch,
        "step_in_epoch": step_in_epoch, "best_metric": best, "rng": rng_state(), "config": resolved(cfg),
        "model_config": asdict(cfg.model), "store_shape": store_shape,
        "store_layout": store_layout, "budget_used_s": clock.used(),
    })


def _validate(cfg, model, dist, autocast, runlog, step, epoch, at: dict[str, float]) -> float:
    """Zero-shot mean AUROC on the validation labels (rank 0 computes; the others wait)."""
    metric = float("nan")
    if dist.is_main:
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        val = CTLabelDataset(cfg.val_ct_filepath, cfg.val_label_path)
        loader = make_loader(val, batch_size=max(1, cfg.batch_size // (cfg.grad_accum * dist.world_size)),
                             num_workers=min(cfg.num_workers, 2))
        feats, labels = encode_loader(model, loader, dist.device, autocast)
        templates = load_templates(cfg.val_templates)
        prompts = prompt_features(model, templates=templates, device=dist.device)
        margins = zero_shot_margins(feats, prompts, templates.scale(float(model.temperature_scale().detach())))
        aurocs = auroc_per_finding(labels, margins)  # ranked by the margin: no ties from saturated softmax
        metric = mean_defined(aurocs)
        runlog.write({"kind": "valid", "step": step, "epoch": epoch, "mean_auroc": metric,
                      "n_volumes": len(val), "seconds": time.perf_counter() - t0, **at,
                      **{f"auroc/{k}": v for k, v in aurocs.items() if not math.isnan(v)}})
        model.train(was_training)
    barrier()
    return metric


def _cached_loader(cfg, model, data, dist, autocast, sampler) -> DataLoader:

    folder = cache_dir(Path(cfg.ct_filepath), cache_key(model, Path(cfg.ct_filepath)))
    n = build_feature_cache(model, data, folder, dist.rank, dist.world_size, dist.device,
                            batch_size=max(1, cfg.batch_size // (cfg.grad_accum * dist.world_size)),
                            num_workers=cfg.num_workers, autocast=autocast, barrier=barrier)
    log.info("feature cache %s: encoded %d volumes on this rank", folder, n)
    cached = CachedReportDataset(data, FeatureCache(folder))
    return DataLoader(cached, batch_sampler=sampler, num_workers=cfg.num_workers)


__all__ = ["TrainConfig", "train", "SetupError", "CheckpointError"]

"""One optimizer step of the contrastive training: `train_step(learner, micro)`.

The micro-batches of a step are this rank's share of the global batch (`GlobalBatchSampler`). With
one micro-batch the step is a plain forward/backward; with several, the features of all of them are
cached first so that every micro-batch's loss sees the negatives of the whole global batch (open_clip
style accumulation). Then clipping, the optimizer (through the GradScaler for fp16) and the schedule.

With a `TextView` (`--text_view_weight` w > 0, one micro-batch per step) the loss is CLIP's plus w times the
same contrastive loss between the batch's reports and a second view of each (its drawn sentences kept with
probability `keep`): the text tower must tell every report from the others by its own sentences, not only by
those the image side already matches. Two towers trained from scratch otherwise never start on findings
that neither reads early: after 30 CPU-minutes the reports' own embeddings did not separate lymph nodes,
nodules, lung opacity, consolidation or coronary calcification (0.56-0.68); with w = 1 the text side reads
them at 0.75-1.00 and the 15-CPU-minute benchmark rose from 0.809 to 0.869 and 0.863 (two seeds;
docs/benchmarks.md).

With `sentence_weight` s > 0 (`--sentence_weight`, text pool "sentence", one micro-batch per step) the loss adds
s times `ctclip.losses.sentence_image_loss`: every sentence of the batch's reports against the batch's volumes,
its target the volumes whose report holds the same sentence, and with `sentence_match_cos` c > 0 also those whose
report holds a sentence at cosine c or more to it (the text tower's embeddings, detached). The report loss sees a
finding only through the mean of a report's drawn sentences (~16 of ~27 at keep 0.6), mostly the easy findings';
this term gives each sentence its own gradient, in the form zero-shot scoring reads the model (one sentence
against a volume). It is local to the rank (its volumes only) under DDP. With identical sentences alone every
other wording of a finding is a negative, and at 1.0 the term cost coronary calcification (0.834 against 0.849
at 0.3); matched at c = 0.7 it gave 0.870 / 0.862 at 1.0 (seeds 42 / 7; 0.868 / 0.867 with more steps), so
train_learning.yaml uses s = 1.0, c = 0.7, and train_demo.yaml, whose 500 steps start slower at 1.0, s = 0.3, c = 0.7
(docs/benchmarks.md).

With `slice_subset` (`--slice_keep` k < 1) each step encodes k of each volume's slices, evenly spaced from a random
start and the same for the whole step on a rank (`SliceSubset`), and the fusion sees them at their places in the
volume; evaluation reads every slice. The from-scratch slice encoder is most of a CPU step, so at 0.5 the
learning benchmark's 15 CPU-minutes hold ~1.9x the steps: 0.920 / 0.920 (seeds 42 / 7) against 0.854-0.863 with
every slice; a random half of the slices instead of every other one gave 0.896-0.912 (docs/benchmarks.md).

The returned and logged loss is the CLIP term alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ctclip.data.reports import sample_sentences
from ctclip.losses import ClipLoss, contrastive_loss_with_cached, sentence_image_loss
from ctclip.models.text import Sentences
from ctcore.distributed import all_reduce_mean

MicroBatch = tuple[torch.Tensor, Sequence[str]]  # (volumes or cached slice embeddings, report texts)


class TrainingStep(nn.Module):
    """What DDP wraps: one forward for volumes (or cached slice embeddings) and report tokens, so
    gradient synchronisation sees every parameter use through DDP's own forward."""

    def __init__(self, model: nn.Module, from_slices: bool):
        super().__init__()
        self.model, self.from_slices = model, from_slices

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor, view_tokens: torch.Tensor | None = None,
                sentences: bool = False, positions: torch.Tensor | None = None) -> tuple[Any, ...]:
        """(volume, text, logit scale); with `view_tokens` or `sentences` also the second text view's embeddings
        (or None) and the reports' sentences (`Sentences`, or None). Both views go through one text batch, so
        that they are centred together; the sentences are those of `tokens`, not of the views. `positions`: the
        indices of the input's slices in their volumes when they are a subset (`SliceSubset`), else None."""
        m = self.model
        v = (m.encode_volume_from_slices(inputs, positions=positions) if self.from_slices
             else m.encode_volume(inputs, positions=positions))
        if view_tokens is None and not sentences:
            return v, m.encode_text(tokens), m.temperature_scale()
        both = tokens if view_tokens is None else torch.cat([tokens, view_tokens])
        sent: Sentences | None = None
        if sentences:
            t, sent = m.encode_text_sentences(both)
            sent = sent.select(sent.text < len(tokens))
        else:
            t = m.encode_text(both)
        views = t[len(tokens):] if view_tokens is not None else None
        return v, t[: len(tokens)], m.temperature_scale(), views, sent


class TextView:
    """The second view of each report for the text-to-text term (module docstring): weight and keep probability.
    The views of a step are drawn from (seed, rank, step), so a resumed run draws the views an uninterrupted one
    would have, with no generator state to checkpoint."""

    def __init__(self, weight: float, keep: float, seed: int, rank: int = 0):
        self.weight, self.keep, self.seed, self.rank = float(weight), float(keep), int(seed), int(rank)

    def views(self, texts: Sequence[str], step: int) -> list[str]:
        rng = np.random.default_rng([self.seed, self.rank, int(step), 20261204])
        return [sample_sentences(t, self.keep, rng) for t in texts]


class SliceSubset:
    """Each training step encodes a subset of each volume's slices (`--slice_keep`): `keep` of the D slices (at
    least one), evenly spaced from a random start, the same ones for every volume of this rank's step. The slice
    encoder is most of a from-scratch CPU step, so a step at 0.5 costs about half as much; evaluation and
    validation read every slice. Drawn from (seed, rank, step), like the text views, so a resumed run draws the
    same subsets.

    Evenly spaced rather than any `keep` of the slices: at 0.5 every other slice, so a lesion that spans two
    slices is always in the step's input (a random half misses both of its slices one time in four), and the
    gaps between the kept slices are all alike. Their indices go to the fusion as positions
    (`SliceFusion.tokens`), so its rotary embedding sees the distances of the whole volume, as at evaluation."""

    def __init__(self, keep: float, seed: int, rank: int = 0):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"slice keep must be in (0, 1], got {keep}")
        self.keep, self.seed, self.rank = float(keep), int(seed), int(rank)

    def indices(self, depth: int, step: int) -> torch.Tensor | None:
        """Increasing slice indices for this step, or None when every slice is kept: `count` = round(keep * depth)
        of them at a spacing of depth / count (rounded down) from a start drawn in [0, depth / count)."""
        count = max(1, round(depth * self.keep))
        if count >= depth:
            return None
        rng = np.random.default_rng([self.seed, self.rank, int(step), 20261205])
        spacing = depth / count
        return torch.from_numpy(np.floor(rng.uniform(0.0, spacing) + np.arange(count) * spacing).astype(np.int64))

    @staticmethod
    def axis(inputs: torch.Tensor) -> int:
        """The slice axis of volumes (B, 1, D, H, W) or of cached slice features (B, D, C)."""
        return 2 if inputs.dim() == 5 else 1

    @staticmethod
    def select(inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Volumes or cached slice features, cut to the slices `idx`."""
        return inputs.index_select(SliceSubset.axis(inputs), idx.to(inputs.device))


@dataclass
class Learner:
    """The model and everything that updates it; a checkpoint holds their state (`state_dicts`)."""

    model: nn.Module  # the CTCLIP: tokenizer, temperature, weights
    step_module: nn.Module  # TrainingStep over `model`, wrapped in DDP in a distributed run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    grad_clip: float
    distributed: bool
    loss_fn: nn.Module = field(default_factory=ClipLoss)
    text_view: TextView | None = None
    sentence_weight: float = 0.0
    sentence_match_cos: float = 0.0
    slice_subset: SliceSubset | None = None

    def state_dicts(self) -> dict[str, Any]:
        """The checkpoint entries model, optimizer, scheduler and scaler ({} without a scaler)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dicts(self, ckpt: dict[str, Any]) -> None:
        """Optimizer, scheduler and scaler of a checkpoint (the weights are loaded before DDP wraps the model)."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def train_step(learner: Learner, micro: Sequence[MicroBatch]) -> float:
    """One optimizer step over this rank's micro-batches. Returns the loss of the global batch."""
    step = learner.scheduler.last_epoch  # optimizer steps taken so far (restored on resume): seeds the draws
    positions = None  # the kept slices' indices in their volumes (every micro-batch of a step has the same depth)
    if learner.slice_subset is not None:
        first = micro[0][0]
        positions = learner.slice_subset.indices(first.shape[SliceSubset.axis(first)], step)
        if positions is not None:
            micro = [(SliceSubset.select(inputs, positions), texts) for inputs, texts in micro]
    tokenized = [(inputs, learner.model.tokenize(list(texts))) for inputs, texts in micro]
    optimizer, scaler = learner.optimizer, learner.scaler
    optimizer.zero_grad(set_to_none=True)
    if learner.text_view is not None or learner.sentence_weight:
        if len(micro) != 1:
            raise ValueError("the text-view and sentence terms need one micro-batch per step")
        views = None
        if learner.text_view is not None:
            views = learner.model.tokenize(learner.text_view.views(micro[0][1], step))
        value = _extra_terms_backward(learner, *tokenized[0], views, positions)
    elif len(tokenized) == 1:
        value = _plain_backward(learner, *tokenized[0], positions)
    else:
        value = _accumulated_backward(learner, tokenized, positions)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, learner.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    learner.scheduler.step()
    return value if not learner.distributed else _mean_over_ranks(value, learner.device)


def _forward(learner: Learner, inputs: torch.Tensor, tokens: torch.Tensor,
             positions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(volume embeddings, text embeddings, logit scale) of one micro-batch; called inside autocast."""
    return learner.step_module(inputs.to(learner.device, non_blocking=True), tokens.to(learner.device),
                               positions=positions)


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _plain_backward(learner: Learner, inputs: torch.Tensor, tokens: torch.Tensor,
                    positions: torch.Tensor | None = None) -> float:
    with learner.autocast():
        v, t, scale = _forward(learner, inputs, tokens, positions)
        loss = learner.loss_fn(v.float(), t.float(), scale.float())
    _backward(loss, learner.scaler)
    return float(loss.detach())


def _extra_terms_backward(learner: Learner, inputs: torch.Tensor, tokens: torch.Tensor,
                          view_tokens: torch.Tensor | None, positions: torch.Tensor | None = None) -> float:
    """CLIP's loss plus the text-view and sentence terms that are on (module docstring); returns CLIP's."""
    with learner.autocast():
        v, t, scale, t2, sent = learner.step_module(
            inputs.to(learner.device, non_blocking=True), tokens.to(learner.device),
            view_tokens.to(learner.device) if view_tokens is not None else None, bool(learner.sentence_weight),
            positions=positions)
        v, t, scale = v.float(), t.float(), scale.float()
        clip = learner.loss_fn(v, t, scale)
        loss = clip
        if t2 is not None:
            loss = loss + learner.text_view.weight * learner.loss_fn(t, t2.float(), scale)
        if sent is not None:
            loss = loss + learner.sentence_weight * sentence_image_loss(sent.features.float(), sent.text, sent.group,
                                                                        v, scale, learner.sentence_match_cos)
    _backward(loss, learner.scaler)
    return float(clip.detach())


def _accumulated_backward(learner: Learner, micro: list[tuple[torch.Tensor, torch.Tensor]],
                          positions: torch.Tensor | None = None) -> float:
    """Gradient accumulation that keeps the global negatives: embed every micro-batch without
    gradient, then recompute each with gradient; `contrastive_loss_with_cached` puts it in its slot
    among the cached embeddings of all micro-batches of all ranks. Every call's value is the loss of
    the whole global batch (reported once); the gradients add up to the full-batch gradient."""
    cached_v, cached_t = [], []
    with torch.no_grad():
        for inputs, tokens in micro:
            with learner.autocast():
                v, t, _ = _forward(learner, inputs, tokens, positions)
            cached_v.append(v.float())
            cached_t.append(t.float())
    ddp = isinstance(learner.step_module, DistributedDataParallel)
    value = float("nan")
    for i, (inputs, tokens) in enumerate(micro):
        last = i == len(micro) - 1
        with (learner.step_module.no_sync() if ddp and not last else contextlib.nullcontext()):
            with learner.autocast():
                v, t, scale = _forward(learner, inputs, tokens, positions)
            loss = contrastive_loss_with_cached(v.float(), t.float(), cached_v, cached_t, i, scale.float())
            _backward(loss, learner.scaler)
        if i == 0:
            value = float(loss.detach())
    return value


def _mean_over_ranks(value: float, device: torch.device) -> float:
    return float(all_reduce_mean(torch.tensor([value], device=device, dtype=torch.float64)))

"""The sequence head: per-slice CNN features and probabilities of a whole study -> per-slice logits.

    from hemorrhage.models.sequence import (SequenceConfig, SequenceModel, pad_features, pad_studies,
                                            predict_both_directions, sequence_loss)
    model = SequenceModel(SequenceConfig(num_models=3, rnn="lstm"))
    features, mask = pad_studies([pad_features([f1, f2, f3]) for f1, f2, f3 in studies])  # (B, T, M, 2048)
    probs, _ = pad_studies(study_probs)                               # (B, T, M, 6), CLASSES order
    out = model(features, probs, mask)                                # out.logits, out.aux_logits: (B, T, 6)
    loss = sequence_loss(out, targets, mask)                          # training
    p = predict_both_directions(model.eval(), features, probs, mask)  # inference: (B, T, 6) probabilities

Structure (after the original ``SequenceModel/main.py``, whose trained weights were never published):
- stage 1, on the features: dropout -> 1x1 convs 2048 -> 512 -> 128 (BN, ReLU, Dropout2d) applied to
  every (slice, model) position, the slice axis being the conv's spatial axis; the M models' 128-d
  vectors are concatenated per slice; a linear layer plus a 2-layer bidirectional RNN (hidden 96) over
  the slices give the auxiliary logits.
- stage 2, on the probabilities: the M models' per-slice probabilities, sigmoid(auxiliary logits) and
  optionally the gap to the next slice (the original's ``Add_position``) are channels of a (T, 6) map;
  temporal convs along the slice axis (kernel 5, then 3 with dilation 2, 4, 2) and a bidirectional RNN
  over the slices, each ending in 6 outputs, are summed into the logits.
The original trained with loss(logits) + loss(aux_logits), the weighted BCE below, and at inference
averaged the probabilities of the study read forwards and backwards. It used GRUs; LSTM is our default.

Padding: studies of different lengths are right-padded to T slices and `mask` (B, T) is True on real
slices. Padded positions never reach real ones: they are zeroed before every temporal conv (exactly the
conv's own zero padding at a study's end), BatchNorm statistics in training count real slices only,
the RNNs run on packed sequences, and the loss skips them. Dropout draws one value per (sample, channel),
so even in training the padding length changes nothing.

The loss lives here with the model because it depends on the mask convention; `hemorrhage/losses.py`
may re-export it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from hemorrhage.classes import CLASS_WEIGHTS, N_CLASSES

FEATURE_WIDTH = 2048  # every CNN's features are zero-padded to the widest (SE-ResNeXt's)
RNN_KINDS = ("lstm", "gru")


@dataclass
class SequenceConfig:
    num_models: int = 3  # M: CNNs whose features and probabilities are stacked per slice
    feature_dim: int = FEATURE_WIDTH
    num_classes: int = N_CLASSES
    rnn: str = "lstm"  # "lstm" | "gru" (the original's)
    hidden: int = 96
    rnn_layers: int = 2
    dropout: float = 0.5
    conv_width: int = 256  # stage-2 channels (the original's 64 * ratio 4); its first conv has twice this
    use_slice_gap: bool = False  # the original's Add_position: distance to the next slice as an extra map

    def __post_init__(self) -> None:
        if self.rnn not in RNN_KINDS:
            raise ValueError(f"SequenceConfig.rnn must be one of {RNN_KINDS}, got {self.rnn!r}")
        for name in ("num_models", "feature_dim", "num_classes", "hidden", "rnn_layers", "conv_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SequenceConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SequenceConfig.dropout must be in [0, 1), got {self.dropout!r}")


class SequenceOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, C): the prediction
    aux_logits: torch.Tensor  # (B, T, C): stage 1 alone, trained with the same loss


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over (B, C, T, W) whose training statistics count only the real slices of `mask` (B, T)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training:
            return super().forward(x)
        x32 = x.float()  # statistics in float32 also under autocast, as BatchNorm does
        w = mask[:, None, :, None].to(x32.dtype)
        n = mask.sum() * x.shape[3]
        mean = (x32 * w).sum((0, 2, 3)) / n
        var = ((x32 - mean[:, None, None]) ** 2 * w).sum((0, 2, 3)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * n / (n - 1).clamp_min(1), factor)  # unbiased, as BatchNorm
        y = (x32 - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)


class TemporalConv(nn.Module):
    """Conv along the slice axis of (B, C, T, W) (kernel (k, 1)), length kept, then BN and ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, (kernel, 1), padding=(dilation * (kernel - 1) // 2, 0),
                              dilation=(dilation, 1), bias=False)
        self.bn = MaskedBatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.relu(self.bn(self.conv(_zero_padding(x, mask)), mask))


def _zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, C, T, W) with padded slices set to 0, so a conv sees what it sees past a study's end."""
    return x if mask is None else x * mask[:, None, :, None].to(x.dtype)


def _make_rnn(cfg: SequenceConfig, input_size: int) -> nn.Module:
    rnn = nn.LSTM if cfg.rnn == "lstm" else nn.GRU
    return rnn(input_size, cfg.hidden, num_layers=cfg.rnn_layers, batch_first=True, bidirectional=True)


def _run_rnn(rnn: nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) -> (B, T, 2 * hidden); with `lengths`, each study is read only up to its own end."""
    if lengths is None:
        return rnn(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def mask_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Slices per study from a (B, T) mask, which must mark a non-empty prefix of each row."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, T) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
    if not torch.equal(prefix, mask) or not bool((lengths > 0).all()):
        raise ValueError("mask must mark real slices first and padding after, with at least one real slice")
    return lengths


class SequenceModel(nn.Module):
    def __init__(self, cfg: SequenceConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SequenceConfig()
        m, c, width = cfg.num_models, cfg.num_classes, cfg.conv_width
        # stage 1: per (slice, model) 1x1 convs, then across slices
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.feat_conv1 = nn.Conv2d(cfg.feature_dim, 512, 1, bias=False)
        self.feat_bn1 = MaskedBatchNorm2d(512)
        self.feat_conv2 = nn.Conv2d(512, 128, 1, bias=False)
        self.feat_bn2 = MaskedBatchNorm2d(128)
        self.feat_head = nn.Linear(128 * m, c)
        self.feat_rnn = _make_rnn(cfg, 128 * m)
        self.feat_rnn_head = nn.Linear(2 * cfg.hidden, c)
        # stage 2: probability maps (T, C) as channels
        in_maps = m + 1 + int(cfg.use_slice_gap)
        self.temporal = nn.ModuleList([
            TemporalConv(in_maps, 2 * width, 5),
            TemporalConv(2 * width, width, 3, dilation=2),
            TemporalConv(width, width, 3, dilation=4),
            TemporalConv(width, width, 3, dilation=2),
        ])
        self.temporal_head = nn.Conv2d(width, 1, (3, 1), padding=(1, 0), bias=False)
        self.prob_rnn = _make_rnn(cfg, width * c)
        self.prob_rnn_head = nn.Linear(2 * cfg.hidden, c)

    def forward(self, features: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None = None,
                slice_gap: torch.Tensor | None = None) -> SequenceOutput:
        """features (B, T, M, F), probs (B, T, M, C) in [0, 1], mask (B, T) bool (None: no padding),
        slice_gap (B, T) (only with ``use_slice_gap``) -> logits (B, T, C), 0 at padded slices."""
        self._check_inputs(features, probs, mask, slice_gap)
        b, t = probs.shape[:2]
        lengths = None if mask is None else mask_lengths(mask)

        x = features.permute(0, 3, 1, 2)  # (B, F, T, M)
        x = self.dropout(x)
        x = self.dropout(F.relu(self.feat_bn1(self.feat_conv1(x), mask)))
        x = self.dropout(F.relu(self.feat_bn2(self.feat_conv2(x), mask)))
        x = x.permute(0, 2, 1, 3).reshape(b, t, -1)  # (B, T, 128 * M)
        aux = self.feat_head(x) + self.feat_rnn_head(_run_rnn(self.feat_rnn, x, lengths))

        maps = [probs.permute(0, 2, 1, 3).to(aux.dtype), torch.sigmoid(aux)[:, None]]
        if self.cfg.use_slice_gap:
            maps.append(slice_gap[:, None, :, None].to(aux.dtype).expand(b, 1, t, aux.shape[-1]))
        y = torch.cat(maps, 1)  # (B, M + 1 [+ 1], T, C)
        for layer in self.temporal:
            y = layer(y, mask)
        conv_logits = self.temporal_head(_zero_padding(y, mask))[:, 0]  # (B, T, C)
        y = y.permute(0, 2, 1, 3).reshape(b, t, -1)  # (B, T, width * C)
        logits = conv_logits + self.prob_rnn_head(_run_rnn(self.prob_rnn, y, lengths))
        if mask is not None:
            pad = ~mask[..., None]
            logits, aux = logits.masked_fill(pad, 0.0), aux.masked_fill(pad, 0.0)
        return SequenceOutput(logits, aux)

    def _check_inputs(self, features: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None,
                      slice_gap: torch.Tensor | None) -> None:
        cfg = self.cfg
        b, t = probs.shape[:2]
        if features.shape != (b, t, cfg.num_models, cfg.feature_dim):
            raise ValueError(f"features must be (B, T, {cfg.num_models}, {cfg.feature_dim}), "
                             f"got {tuple(features.shape)}")
        if probs.shape != (b, t, cfg.num_models, cfg.num_classes):
            raise ValueError(f"probs must be (B, T, {cfg.num_models}, {cfg.num_classes}), got {tuple(probs.shape)}")
        if mask is not None and mask.shape != (b, t):
            raise ValueError(f"mask must be (B, T) = {(b, t)}, got {tuple(mask.shape)}")
        if cfg.use_slice_gap and (slice_gap is None or slice_gap.shape != (b, t)):
            raise ValueError("use_slice_gap is set: pass slice_gap (B, T), the distance to the next slice")


def pad_features(per_model: Sequence[torch.Tensor], width: int = FEATURE_WIDTH) -> torch.Tensor:
    """One study's features of M models, each (T, d_m) with d_m <= width -> (T, M, width), zero-padded."""
    too_wide = [tuple(f.shape) for f in per_model if f.ndim != 2 or f.shape[1] > width]
    if too_wide:
        raise ValueError(f"features must be (T, d) with d <= {width}, got {too_wide}")
    return torch.stack([F.pad(f, (0, width - f.shape[1])) for f in per_model], dim=1)


def pad_studies(studies: Sequence[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Studies (T_i, ...) -> right-padded batch (B, max T, ...) and its mask (B, max T), True on real slices."""
    lengths = torch.tensor([s.shape[0] for s in studies])
    batch = pad_sequence(list(studies), batch_first=True, padding_value=value)
    mask = torch.arange(batch.shape[1]) < lengths[:, None]
    return batch, mask.to(batch.device)


def reverse_slices(x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse the slice order (dim 1) of each study within its own length; padding stays where it is."""
    if lengths is None:
        return x.flip(1)
    t = torch.arange(x.shape[1], device=x.device)
    last = lengths.to(x.device)[:, None] - 1
    index = torch.where(t <= last, last - t, t)  # (B, T)
    index = index.view(*index.shape, *([1] * (x.ndim - 2))).expand_as(x)
    return x.gather(1, index)


def predict_both_directions(model: SequenceModel, features: torch.Tensor, probs: torch.Tensor,
                            mask: torch.Tensor | None = None,
                            slice_gap: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities (B, T, C): the mean of sigmoid(logits) with the study read forwards and reversed."""
    if model.training:
        raise ValueError("predict_both_directions needs model.eval(): dropout and batch statistics are on")
    lengths = None if mask is None else mask_lengths(mask)

    def rev(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else reverse_slices(x, lengths)

    with torch.inference_mode():
        forward = torch.sigmoid(model(features, probs, mask, slice_gap).logits)
        backward = torch.sigmoid(model(rev(features), rev(probs), mask, rev(slice_gap)).logits)
        mean = (forward + rev(backward)) / 2
        return mean if mask is None else mean.masked_fill(~mask[..., None], 0.0)


def masked_weighted_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                        class_weights: Sequence[float] = CLASS_WEIGHTS) -> torch.Tensor:
    """Weighted multi-label BCE over the real slices: per-class mean, then ``sum(w * bce) / sum(w)``.

    With weights [2, 1, 1, 1, 1, 1] this is the competition metric; padded slices (mask False) are left
    out entirely, whatever their logits or targets hold.
    """
    if mask is not None:
        logits, targets = logits[mask], targets[mask]  # (N, C): the real slices only
    per_class = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), reduction="none").reshape(-1, logits.shape[-1]).mean(0)
    w = torch.as_tensor(class_weights, dtype=per_class.dtype, device=per_class.device)
    return (per_class * w).sum() / w.sum()


def sequence_loss(out: SequenceOutput, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  class_weights: Sequence[float] = CLASS_WEIGHTS) -> torch.Tensor:
    """The original's training loss: the weighted BCE of the logits plus that of the auxiliary logits."""
    return (masked_weighted_bce(out.logits, targets, mask, class_weights)
            + masked_weighted_bce(out.aux_logits, targets, mask, class_weights))


def slice_gaps(positions: Sequence[float]) -> list[float]:
    """Distance (mm) from each slice to the next along the normal, the last repeating the one before it
    (the ``use_slice_gap`` input); unknown positions (NaN) give 0, a one-slice series [0]."""
    pos = torch.as_tensor(list(positions), dtype=torch.float64)
    if pos.numel() < 2:
        return [0.0] * pos.numel()
    gaps = torch.nan_to_num((pos[1:] - pos[:-1]).abs(), nan=0.0)
    return torch.cat([gaps, gaps[-1:]]).tolist()

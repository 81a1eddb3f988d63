"""The loaded ensemble: every (member, fold) CNN on the device, TTA passes, and the sequence heads.

    ens = CNNEnsemble.load(inventory, device, input_sizes={"DenseNet121_change_avg_512": 512})
    out = ens.predict({256: x256, 512: x512}, want_features=True)   # x: uint8 (P, B, 3, h, w) on the device
    out["DenseNet121_change_avg_512"].probs      # (B, folds, 6), mean over the TTA passes

Probabilities are averaged over TTA passes, then over folds, then over members (equal weights), as the
original averaged its passes and folds. Features (the penultimate vectors the sequence head reads) are
averaged over TTA passes too, as the original's feature files were, but never over folds: each fold's
CNN has its own feature space, so the sequence head runs once per fold and its outputs are averaged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ctcore.precision import autocast_context, autocast_dtype
from hemorrhage.classes import N_CLASSES
from hemorrhage.models.checkpoint import ModelWeights, WeightsInventory, load_original_checkpoint
from hemorrhage.models.cnn import HemorrhageCNN, build_cnn, normalize_uint8
from hemorrhage.models.sequence import FEATURE_WIDTH, pad_features, pad_studies, predict_both_directions
from hemorrhage.models.sequence_checkpoint import Member, SequenceCheckpoint, member_label

log = logging.getLogger(__name__)

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp (the ctcore.precision vocabulary): 'auto' -> bf16 on CUDA, None (fp32) on the CPU."""
    try:
        return autocast_dtype(amp, device)
    except ValueError as e:
        raise ValueError(f"--amp: {e}") from None


@dataclass
class LoadedMember:
    weights: ModelWeights
    input_size: int
    models: list[HemorrhageCNN]  # one per fold, eval mode, on the device
    epochs: list[int | None] = field(default_factory=list)
    val_losses: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return member_label(self.key)

    @property
    def key(self) -> Member:
        return (self.weights.name, self.weights.image_size)

    @property
    def folds(self) -> list[int]:
        return self.weights.folds


@dataclass
class MemberOutput:
    probs: torch.Tensor  # (B, folds, 6) float32, mean over TTA passes
    features: torch.Tensor | None  # (B, folds, feature_dim) float32


class CNNEnsemble:
    def __init__(self, members: list[LoadedMember], device: torch.device, amp: torch.dtype | None,
                 flip_tta: bool = False, channels_last: bool | None = None) -> None:
        self.members, self.device, self.amp = members, device, amp
        self.flip_tta = flip_tta
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.autocast = autocast_context(device, amp)

    @classmethod
    def load(cls, inventory: WeightsInventory, device: torch.device, amp: torch.dtype | None = None,
             input_sizes: dict[str, int] | None = None, flip_tta: bool = False,
             channels_last: bool | None = None) -> CNNEnsemble:
        """Build and strictly load every fold of every member (files were checked by `check_weights`)."""
        members = []
        last = channels_last if channels_last is not None else device.type == "cuda"
        for mw in inventory.models:
            label = member_label((mw.name, mw.image_size))
            size = (input_sizes or {}).get(label, mw.image_size)
            m = LoadedMember(mw, size, [])
            for f in mw.files:
                model = build_cnn(mw.name)
                ckpt = load_original_checkpoint(model, f.path)
                model = model.to(device).eval()
                if last:
                    model = model.to(memory_format=torch.channels_last)
                m.models.append(model)
                m.epochs.append(ckpt.epoch)
                m.val_losses.append(ckpt.val_loss)
                m.notes.append(ckpt.note)
            log.info("loaded %s: folds %s at %d px", label, mw.folds, size)
            members.append(m)
        return cls(members, device, amp, flip_tta, channels_last)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted({m.input_size for m in self.members}))

    def _passes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x uint8 (P, B, 3, h, w) -> the list of (B, 3, h, w) passes (flip set expanded on the device)."""
        passes = list(x.unbind(0))
        if self.flip_tta:
            passes = [v for p in passes for v in (p, p.flip(-1), p.flip(1), p.flip(1).flip(-1))]
        return passes

    @torch.inference_mode()
    def predict(self, inputs: dict[int, torch.Tensor], want_features: bool = False) -> dict[str, MemberOutput]:
        out = {}
        for m in self.members:
            passes = self._passes(inputs[m.input_size])
            probs, feats = [], []
            for model in m.models:
                p_sum, f_sum = None, None
                for x in passes:
                    x = normalize_uint8(x)
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with self.autocast():
                        logits, features = model(x, return_features=True)
                    p = torch.sigmoid(logits.float())
                    p_sum = p if p_sum is None else p_sum + p
                    if want_features:
                        f = features.float()
                        f_sum = f if f_sum is None else f_sum + f
                probs.append(p_sum / len(passes))
                if want_features:
                    feats.append(f_sum / len(passes))
            out[m.label] = MemberOutput(torch.stack(probs, 1), torch.stack(feats, 1) if want_features else None)
        return out


def ensemble_mean(member_probs: dict[str, np.ndarray]) -> np.ndarray:
    """{label: (S, folds, 6)} -> (S, 6): mean over folds, then over members."""
    return np.mean([p.mean(1) for p in member_probs.values()], axis=0)


def sequence_folds(members: list[LoadedMember], heads: list[SequenceCheckpoint]) -> tuple[list[int], list[str]]:
    """(CNN folds every member a head reads has, problems): the head runs once per such fold."""
    if not heads:
        return [], []
    by_key = {m.key: m for m in members}
    need = heads[0].members
    missing = [member_label(k) for k in need if k not in by_key]
    if missing:
        have = [m.label for m in members]
        return [], [f"the sequence head reads {[member_label(k) for k in need]} but {missing} is not among the "
                    f"loaded CNNs {have} (check --models and --weights_dir)"]
    folds = sorted(set.intersection(*(set(by_key[k].folds) for k in need)))
    if not folds:
        return [], [f"the members the sequence head reads share no fold: "
                    f"{ {member_label(k): by_key[k].folds for k in need} }"]
    return folds, []


@torch.inference_mode()
def apply_sequence_heads_batch(heads: list[SequenceCheckpoint], folds: list[int], members: list[LoadedMember],
                               series: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]],
                               device: torch.device) -> list[np.ndarray]:
    """Series (member probs {label: (S, folds, 6)}, features {label: (S, folds, d)}, slice gaps (S,)) ->
    per series (S, 6): the mean over heads and CNN folds of each head's both-direction probabilities.

    The series are right-padded into one batch per (head, fold) and the padding mask keeps them apart: a
    head is too small to keep a CPU busy, and one call per series spent its time starting threads."""
    by_key = {m.key: m for m in members}
    lengths = [len(next(iter(p.values()))) for p, _, _ in series]
    total = [np.zeros((n, N_CLASSES), np.float64) for n in lengths]
    runs = 0
    for head in heads:
        for fold in folds:
            cols = [by_key[key].folds.index(fold) for key in head.members]
            labels = [member_label(key) for key in head.members]
            f, mask = pad_studies([pad_features([torch.from_numpy(feats[lb][:, j]) for lb, j in zip(labels, cols)],
                                                FEATURE_WIDTH) for _, feats, _ in series])
            p, _ = pad_studies([torch.stack([torch.from_numpy(probs[lb][:, j]) for lb, j in zip(labels, cols)], 1)
                                for probs, _, _ in series])
            gap = None
            if head.model.cfg.use_slice_gap:
                gap, _ = pad_studies([torch.from_numpy(np.asarray(g, np.float32)) for _, _, g in series])
                gap = gap.to(device)
            out = predict_both_directions(head.model, f.to(device), p.to(device), mask.to(device), gap)
            out = out.float().cpu().numpy()
            for i, n in enumerate(lengths):
                total[i] += out[i, :n]
            runs += 1
    return [(t / runs).astype(np.float32) for t in total]

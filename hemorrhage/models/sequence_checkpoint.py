"""Sequence-head checkpoints: the weights plus what the head needs to be rebuilt and fed at inference.

No sequence-head weights were ever published, so the format is ours. One file holds

    {"format": "hemorrhage-sequence-v1", "config": asdict(SequenceConfig), "state_dict": {...},
     "members": [["se_resnext101_32x4d", 256], ...], "epoch": int, "valLoss": float, "fold": int | None,
     "inputs": {"tta": ..., "window": ..., "center_crop": ...}}   # how its training features were made

`inputs` (optional) lets inference warn when it feeds the head features made differently (another TTA,
window or crop shifts the feature distribution the head learned).

`members` are the CNN ensemble members, in the order of the head's model axis M, whose features and
probabilities it was trained on: inference must feed the same members in the same order. Everything
is plain data and tensors, so `torch.load(..., weights_only=True)` reads it.

    save_sequence_checkpoint(model, "runs/seq/sequence_fold0.pth", members=[("DenseNet121_change_avg", 512)],
                             epoch=7, val_loss=0.061, fold=0)
    ckpts = load_sequence_checkpoints("runs/seq")     # a file, or every *.pth in a folder
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ctcore.atomic import atomic_write
from hemorrhage.models.checkpoint import CheckpointError, state_dict_problems
from hemorrhage.models.sequence import SequenceConfig, SequenceModel

SEQUENCE_FORMAT = "hemorrhage-sequence-v1"
Member = tuple[str, int]  # (architecture, input size): one weights folder <architecture>_<size>/


@dataclass
class SequenceCheckpoint:
    path: Path
    model: SequenceModel  # eval mode, on the CPU
    members: list[Member]
    epoch: int | None
    val_loss: float | None
    fold: int | None
    inputs: dict = field(default_factory=dict)  # how the training features were made; {} if unknown


def member_label(member: Member) -> str:
    return f"{member[0]}_{member[1]}"


def save_sequence_checkpoint(model: SequenceModel, path: str | os.PathLike, members: Sequence[Member],
                             epoch: int, val_loss: float, fold: int | None = None,
                             inputs: dict[str, str | float | int] | None = None) -> Path:
    """Write the head atomically; `members` must match the head's model axis."""
    members = [(str(n), int(s)) for n, s in members]
    if len(members) != model.cfg.num_models:
        raise ValueError(f"the head takes {model.cfg.num_models} models but {len(members)} members were given")
    path = Path(path)
    obj = {"format": SEQUENCE_FORMAT, "config": asdict(model.cfg),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "members": [list(m) for m in members], "epoch": int(epoch), "valLoss": float(val_loss),
           "fold": None if fold is None else int(fold), "inputs": dict(inputs or {})}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


def load_sequence_checkpoint(path: str | os.PathLike) -> SequenceCheckpoint:
    """Read one file written by `save_sequence_checkpoint` (strict; ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequence checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling, truncated zip, random bytes: all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != SEQUENCE_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a sequence-head checkpoint (format {SEQUENCE_FORMAT!r} expected, "
                              f"found {found!r}); a CNN checkpoint goes in --weights_dir")
    known = {f.name for f in fields(SequenceConfig)}
    try:
        cfg = SequenceConfig(**{k: v for k, v in obj["config"].items() if k in known})
        members = [(str(n), int(s)) for n, s in obj["members"]]
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed sequence checkpoint ({type(e).__name__}: {e})") from e
    model = SequenceModel(cfg)
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path} does not fit its own config:\n" + "\n".join(f"  {p}" for p in problems))
    if len(members) != cfg.num_models:
        raise CheckpointError(f"{path}: {len(members)} members listed for a head of {cfg.num_models} models")
    model.load_state_dict(state, strict=True)
    inputs = obj.get("inputs") if isinstance(obj.get("inputs"), dict) else {}
    return SequenceCheckpoint(path, model.eval(), members, obj.get("epoch"), obj.get("valLoss"), obj.get("fold"),
                              inputs)


def load_sequence_checkpoints(path: str | os.PathLike) -> list[SequenceCheckpoint]:
    """A file, or every ``*.pth`` in a folder (e.g. one head per fold); all must expect the same members."""
    path = Path(path)
    files = sorted(path.glob("*.pth")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.pth sequence checkpoint in {path}")
    ckpts = [load_sequence_checkpoint(f) for f in files]
    first = ckpts[0]
    for c in ckpts[1:]:
        if c.members != first.members:
            raise CheckpointError(f"sequence heads disagree on their input models: {first.path.name} takes "
                                  f"{[member_label(m) for m in first.members]}, {c.path.name} takes "
                                  f"{[member_label(m) for m in c.members]}")
    return ckpts

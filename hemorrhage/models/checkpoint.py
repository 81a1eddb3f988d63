"""Checkpoints of the 2D CNNs in the original file format, and the check of a weights folder.

The original ``2DNet/src/train.py`` saved ``{'epoch': int, 'state_dict': ..., 'valLoss': float}`` from a
``torch.nn.DataParallel`` wrapper, so every key starts with ``module.``; the best epoch of each fold was
kept as ``model_epoch_best_{fold}.pth`` (folds 0-4). We write our own checkpoints in that same format, so
published and retrained weights are interchangeable.

    from hemorrhage.models import build_cnn
    from hemorrhage.models.checkpoint import check_weights, load_original_checkpoint, save_original_checkpoint

    inventory = check_weights("models/2DNet")       # before any image is read: every problem at once
    inventory.raise_if_problems()
    for member in inventory.models:                 # e.g. DenseNet121_change_avg at 512 px, folds 0-4
        model = build_cnn(member.name)
        load_original_checkpoint(model, member.files[0].path)   # strict; weights_only=True

    save_original_checkpoint(model, "runs/x/model_epoch_best_0.pth", epoch=12, val_loss=0.071)

Weights layout (the seed's ``models/2DNet/``): one folder per ensemble member named
``<architecture>_<input size>``, e.g. ``se_resnext101_32x4d_256/``, ``DenseNet169_change_avg_256/``,
``DenseNet121_change_avg_512/``, each holding ``model_epoch_best_{0..4}.pth``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ctcore.atomic import atomic_write
from hemorrhage.models.cnn import build_cnn, cnn_spec, list_cnns

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "model_epoch_best_{fold}.pth"
FOLDS: tuple[int, ...] = (0, 1, 2, 3, 4)
DP_PREFIX = "module."
# (architecture, input size) of the published ensemble, i.e. the folders of the seed's models/2DNet/
SEED_ENSEMBLE: tuple[tuple[str, int], ...] = (
    ("se_resnext101_32x4d", 256),
    ("DenseNet169_change_avg", 256),
    ("DenseNet121_change_avg", 512),
)
_SHOW = 5  # keys listed per category in an error message
# torchvision < 0.3 named DenseNet layers ``norm.1``/``conv.2``; its own loader renames them the same way
_LEGACY_DENSENET_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


class CheckpointError(ValueError):
    """A file that is not a checkpoint, or one that does not fit the model it was given to."""


@dataclass(frozen=True)
class OriginalCheckpoint:
    state_dict: dict[str, torch.Tensor]  # ``module.`` removed
    epoch: int | None = None
    val_loss: float | None = None
    note: str = ""  # our files may say what they are (e.g. "randomly initialised"); published ones do not


def weights_folder_name(name: str, image_size: int) -> str:
    return f"{name}_{image_size}"


def parse_weights_folder(folder: str) -> tuple[str, int]:
    """``'DenseNet121_change_avg_512'`` -> (``'DenseNet121_change_avg'``, 512); ValueError if not that form."""
    stem, sep, size = folder.rpartition("_")
    if not sep or not size.isdigit() or int(size) <= 0:
        raise ValueError(f"{folder!r} is not <architecture>_<input size>")
    cnn_spec(stem)  # raises for an unknown architecture
    return stem, int(size)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state dict is stored: DataParallel/DDP and torch.compile wrappers removed."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _strip_dp_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a bare state dict (saved without DataParallel) is accepted as it is
    if state and all(k.startswith(DP_PREFIX) for k in state):
        return {k[len(DP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def _rename_legacy_densenet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_LEGACY_DENSENET_KEY.sub(r"\1\2.", k): v for k, v in state.items()}


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:_SHOW]
        return f"a {type(obj).__name__} with keys {keys}{' ...' if len(obj) > _SHOW else ''}"
    return f"a {type(obj).__name__}"


def read_original_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                             mmap: bool = False) -> OriginalCheckpoint:
    """Read a ``{'epoch', 'state_dict', 'valLoss'}`` file (or a bare state dict) with ``weights_only=True``.

    `mmap` maps tensors instead of reading them (zip-format files only; 2019-era files may be the older
    tar format, for which it is ignored).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except Exception as e:  # unpickling, truncated zip, random bytes: all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state, epoch, val_loss = obj["state_dict"], obj.get("epoch"), obj.get("valLoss")
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, epoch, val_loss = obj, None, None
    else:
        raise CheckpointError(f"{path} is not a model checkpoint: expected a dict with 'state_dict' "
                              f"(and 'epoch', 'valLoss') or a state dict, found {_describe(obj)}")
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors ({_describe(state)})")
    note = obj.get("note", "") if isinstance(obj, Mapping) else ""
    return OriginalCheckpoint(
        state_dict=_rename_legacy_densenet(_strip_dp_prefix(state)),
        epoch=None if epoch is None else int(epoch),
        val_loss=None if val_loss is None else float(val_loss),
        note=note if isinstance(note, str) else "",
    )


def _listing(label: str, items: Sequence[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{label} {len(items)}: {', '.join(items[:_SHOW])}{more}"


def state_dict_problems(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, each a line with the first few names and a count."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} file {tuple(found[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in found and found[k].shape != v.shape]
    return [_listing(label, items) for label, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]


def expected_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict layout of a registered architecture, built on the meta device (no memory, ~0.1 s)."""
    with torch.device("meta"):
        return build_cnn(name).state_dict()


def identify_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered architecture whose keys and shapes `state` matches exactly, if any."""
    for name in list_cnns(include_test_only=True):
        if not state_dict_problems(expected_state(name), state):
            return name
    return None


def _mismatch_message(path: Path, model_name: str, expected: Mapping, found: Mapping) -> str:
    lines = [f"{path} does not fit {model_name} ({len(expected)} keys expected, {len(found)} in the file):"]
    lines += [f"  {p}" for p in state_dict_problems(expected, found)]
    other = identify_architecture(found)
    if other is not None:
        lines.append(f"  the file holds a {other} checkpoint")
    return "\n".join(lines)


def load_original_checkpoint(model: nn.Module, path: str | os.PathLike,
                             map_location: str | torch.device = "cpu") -> OriginalCheckpoint:
    """Strictly load an original-format file into `model` (a DataParallel wrapper is fine too)."""
    path = Path(path)
    target = _unwrap(model)
    ckpt = read_original_checkpoint(path, map_location=map_location)
    expected = target.state_dict()
    if state_dict_problems(expected, ckpt.state_dict):
        name = getattr(target, "name", "") or type(target).__name__
        raise CheckpointError(_mismatch_message(path, name, expected, ckpt.state_dict))
    target.load_state_dict(ckpt.state_dict, strict=True)
    return ckpt


def save_original_checkpoint(model: nn.Module, path: str | os.PathLike, epoch: int,
                             val_loss: float, note: str = "") -> Path:
    """Write what the original wrote: ``{'epoch', 'state_dict' (keys ``module.*``), 'valLoss'}``, atomically.

    Tensors are stored on the CPU (the original stored CUDA tensors; loading maps them anyway). A file of
    this format holds no optimizer state: resumable training state belongs in a separate file. A `note`
    (an extra ``'note'`` entry, ignored by the original code) travels into the inference run record.
    """
    path = Path(path)
    state = _unwrap(model).state_dict()
    out = OrderedDict((DP_PREFIX + k, v.detach().cpu()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # module versions (BatchNorm's matters), named as in DataParallel's state dict
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            [("", {"version": nn.DataParallel._version})]
            + [(DP_PREFIX + k if k else "module", v) for k, v in metadata.items()])
    obj = {"epoch": int(epoch), "state_dict": out, "valLoss": float(val_loss)}
    if note:
        obj["note"] = str(note)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


# ---------------------------------------------------------------------------------------------------------
# the weights folder


@dataclass(frozen=True)
class WeightFile:
    fold: int
    path: Path
    sha256: str
    size_bytes: int


@dataclass
class ModelWeights:
    """One ensemble member: an architecture at one input size, with the fold files found."""

    name: str
    image_size: int
    folder: Path
    files: list[WeightFile] = field(default_factory=list)

    @property
    def folds(self) -> list[int]:
        return [f.fold for f in self.files]


@dataclass
class WeightsInventory:
    root: Path
    models: list[ModelWeights] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # what was left out, and why (not errors)
    problems: list[str] = field(default_factory=list)  # what makes the folder unusable as asked

    def records(self) -> list[dict[str, object]]:
        """One row per file, for logging next to predictions (which weights produced them)."""
        return [{"model": m.name, "image_size": m.image_size, "fold": f.fold, "path": str(f.path),
                 "sha256": f.sha256, "size_bytes": f.size_bytes} for m in self.models for f in m.files]

    def raise_if_problems(self) -> None:
        if self.problems:
            raise CheckpointError(f"weights under {self.root}: {len(self.problems)} problem(s)\n"
                                  + "\n".join(f"- {p}" for p in self.problems))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_weights(root: str | os.PathLike, folds: Iterable[int] = FOLDS, hash_files: bool = True,
                 require_all_folds: bool = True, only: Collection[str] | None = None) -> WeightsInventory:
    """The ensemble members under `root`: every ``<architecture>_<size>/`` folder, with its fold files.

    Seed folders that are absent are left out with a message; an empty member, or one lacking a fold
    when `require_all_folds`, is a problem. Files are hashed (sha256) unless `hash_files` is False.
    `only` keeps the members named by architecture (``DenseNet121_change_avg``) or folder
    (``DenseNet121_change_avg_512``); a name that matches no folder is a problem.
    """
    root = Path(root)
    inv = WeightsInventory(root=root)
    if not root.is_dir():
        inv.problems.append(f"weights folder not found: {root}")
        return inv
    folds = tuple(folds)
    matched: set[str] = set()
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            name, size = parse_weights_folder(sub.name)
        except ValueError as e:
            inv.messages.append(f"ignored {sub.name}/: {e}")
            continue
        if only is not None:
            hits = {n for n in only if n in (name, sub.name)}
            matched |= hits
            if not hits:
                inv.messages.append(f"left out {sub.name}/: not among the models asked for")
                continue
        member = ModelWeights(name=name, image_size=size, folder=sub)
        for fold in folds:
            file = sub / CHECKPOINT_NAME.format(fold=fold)
            if file.is_file():
                digest = sha256_file(file) if hash_files else ""
                member.files.append(WeightFile(fold, file, digest, file.stat().st_size))
            elif require_all_folds:
                inv.problems.append(f"missing {file}")
        if member.files:
            inv.models.append(member)
        elif not require_all_folds:
            inv.problems.append(f"{sub} holds no {CHECKPOINT_NAME.format(fold='<fold>')} file")
    for name in sorted(set(only or ()) - matched):
        inv.problems.append(f"no weights folder for {name!r} under {root} (folders are <architecture>_<size>/)")
    for name, size in SEED_ENSEMBLE:
        if only is None and not (root / weights_folder_name(name, size)).is_dir():
            inv.messages.append(f"left out {name} ({size} px): no folder {weights_folder_name(name, size)}/")
    for message in inv.messages:
        log.info("%s", message)
    if not inv.models and not inv.problems:
        inv.problems.append(f"no <architecture>_<size>/ folder with checkpoints under {root} "
                            f"(architectures: {', '.join(list_cnns())})")
    return inv


def check_weights(root: str | os.PathLike, folds: Iterable[int] = FOLDS,
                  expected_sha256: Mapping[str, str] | None = None, verify_contents: bool = True,
                  require_all_folds: bool = True, only: Collection[str] | None = None) -> WeightsInventory:
    """`find_weights`, then every file opened (``weights_only``, memory-mapped where possible) and its keys
    and shapes compared with its folder's architecture; `expected_sha256` maps ``folder/file`` names to
    digests. All problems are collected; nothing is raised (see `WeightsInventory.raise_if_problems`).
    """
    inv = find_weights(root, folds, hash_files=True, require_all_folds=require_all_folds, only=only)
    for member in inv.models:
        expected = expected_state(member.name) if verify_contents else {}
        for f in member.files:
            rel = f"{member.folder.name}/{f.path.name}"
            if expected_sha256 is not None and rel in expected_sha256 and expected_sha256[rel] != f.sha256:
                inv.problems.append(f"{f.path}: sha256 {f.sha256} differs from the expected {expected_sha256[rel]}")
            if not verify_contents:
                continue
            try:
                found = read_original_checkpoint(f.path, mmap=True).state_dict
            except CheckpointError as e:
                inv.problems.append(str(e))
                continue
            if state_dict_problems(expected, found):
                inv.problems.append(_mismatch_message(f.path, member.name, expected, found))
    log.info("weights under %s: %s; %d problem(s)", inv.root,
             ", ".join(f"{m.name}@{m.image_size}px folds {m.folds}" for m in inv.models) or "none",
             len(inv.problems))
    return inv


RANDOM_NOTE = "randomly initialised (seed {seed}), not trained: its predictions mean nothing"


def save_random_weights(root: str | os.PathLike, members: Sequence[tuple[str, int]] = SEED_ENSEMBLE,
                        folds: Iterable[int] = FOLDS, seed: int = 0) -> list[Path]:
    """A weights folder in the published layout filled with randomly initialised models, each file
    carrying a note that says so: for smoke tests and demos of the pipeline before any training."""
    paths = []
    for name, size in members:
        for fold in folds:
            torch.manual_seed(seed * 1000 + fold)
            model = build_cnn(name)
            path = Path(root) / weights_folder_name(name, size) / CHECKPOINT_NAME.format(fold=fold)
            paths.append(save_original_checkpoint(model, path, epoch=0, val_loss=float("nan"),
                                                  note=RANDOM_NOTE.format(seed=seed)))
    return paths

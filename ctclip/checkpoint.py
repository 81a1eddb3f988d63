"""Training checkpoints: everything needed to continue bit-for-bit, written atomically, loaded safely.

A checkpoint is a plain dict of tensors and primitive containers (so `torch.load(weights_only=True)`
reads it): model, optimizer, scheduler and scaler state, step/epoch/position in the epoch, the RNG
states of torch, numpy and random (numpy's as a tensor + ints), the resolved training config, the model
config and the best validation metric so far.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctclip.models.config import ModelConfig
from ctclip.models.factory import create_model as build_model
from ctcore.atomic import atomic_write

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save through ctcore.atomic: never a half file."""
    return atomic_write(path, lambda tmp: torch.save({"checkpoint_version": CHECKPOINT_VERSION, **state}, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "checkpoint_version" not in ckpt:
        raise CheckpointError(f"{path}: not a ctclip training checkpoint (no 'model' / 'checkpoint_version')")
    return ckpt


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`--resume latest` means <output_dir>/latest.pt when it exists (a fresh start otherwise)."""
    if resume is None:
        return None
    if resume == "latest":
        p = output_dir / "latest.pt"
        return p if p.is_file() else None
    return Path(resume)


def check_model_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A checkpoint of another architecture is refused before any weight is touched."""
    # checkpoints older than these settings were trained with min-max slices, EOT pooling, no centring, the
    # CLS volume token, a causal text tower and no slice histograms or granulometry
    saved = {"slice_norm": "minmax", "text_pool": "eot", "embed_center": False, "fusion_pool": "cls",
             "text_causal": True, "slice_hist_bins": 0, "slice_hist_grid": 2, "slice_gran_levels": 0, **saved}
    keys = ("slice_encoder", "image_size", "slice_norm", "slice_hist_bins", "slice_hist_grid", "slice_gran_levels",
            "fusion_dim",
            "fusion_depth", "fusion_heads", "fusion_pool", "embed_dim", "context_length", "text_width", "text_layers",
            "text_heads", "text_pool", "text_causal", "embed_center")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"{path} was trained with another architecture: " + "; ".join(diff))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit the model; missing {result.missing_keys[:5]} "
                              f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} "
                              f"({len(result.unexpected_keys)})")


def load_trained_model(path: str | Path, device: torch.device | str = "cpu"):
    """(CTCLIP in eval mode on `device`, checkpoint metadata) from a training checkpoint (latest.pt,
    best.pt). The architecture comes from the checkpoint's model config; the weights all come from
    the checkpoint, so the original backbone / text weight files are not needed."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    saved = dict(ckpt.get("model_config") or {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"{path}: model settings {unknown} are unknown to this version of ctclip")
    saved.update(dinov2_weights=None, text_weights=None, dinov2_source="file", grad_checkpointing=False)
    encoder_log = logging.getLogger("ctclip.models.slice_encoder")
    level = encoder_log.level
    encoder_log.setLevel(logging.ERROR)  # "randomly initialised" is wrong here: the checkpoint fills it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = build_model(ModelConfig(**saved))
    finally:
        encoder_log.setLevel(level)
    load_model_state(model, ckpt["model"], path)
    meta = {k: ckpt.get(k) for k in ("step", "epoch", "best_metric", "config", "model_config", "store_shape",
                                            "store_layout")}
    return model.to(device).eval(), meta

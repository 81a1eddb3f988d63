"""Comparing a training run with a reference run: their per-epoch logs and their saved weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def epoch_log(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """The run's JSONL log, each line cut to ``keys`` (the clock fields of two runs always differ)."""
    return [{k: r.get(k) for k in keys} for r in map(json.loads, path.read_text().splitlines())]


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints (a CNN's ``state_dict`` or a sequence head's ``model``) hold identical tensors."""
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    sa, sb = (s.get("state_dict", s.get("model")) for s in (sa, sb))
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{a} and {b} differ in {differ[:5]}"

"""Sharded preprocessing for cluster array jobs: which shard a volume belongs to, and the shard stores' names.

A SLURM array preprocesses the volumes in N shards, each task into its own store::

    python scripts/ctclip_preprocess.py ... --ct_out_path data/train_volumes.h5 --num_shards 16 --shard_index 3
        -> data/train_volumes.shard-03-of-16.h5 (and data/train_volumes.shard-03-of-16.h5.errors.csv)

A volume's shard is a hash of its VolumeName (`shard_of`) and nothing else, so every volume is in
exactly one shard, and re-running a task, adding files to the folder or changing --limit never moves a
volume to another shard (a round-robin over the sorted names would move most of them when one file is
added, and the old shard stores would then hold volumes of other shards). Shard sizes are balanced
statistically (within a few standard deviations of n/N), not exactly.

The shard stores are merged into one store by `ctclip.run.merge_stores` (scripts/ctclip_merge_stores.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def check_shard(shard_index: int | None, num_shards: int | None) -> tuple[int, int] | None:
    """(shard_index, num_shards), or None for an unsharded run; ValueError names the bad flag."""
    if shard_index is None and num_shards is None:
        return None
    if shard_index is None or num_shards is None:
        raise ValueError("--shard_index and --num_shards go together (e.g. --shard_index $SLURM_ARRAY_TASK_ID "
                         "--num_shards N)")
    if num_shards < 1:
        raise ValueError(f"--num_shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index {shard_index} is outside 0..{num_shards - 1} (--num_shards {num_shards}); "
                         f"submit the array as --array=0-{num_shards - 1}")
    return shard_index, num_shards


def shard_of(name: str, num_shards: int) -> int:
    """The shard of a VolumeName: the first 8 bytes of its sha256, modulo N (stable across runs and
    machines, unlike Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % num_shards


def select_shard(items: Iterable[T], shard_index: int, num_shards: int, key: Callable[[T], str] = str) -> list[T]:
    """The items of one shard, in their order; `key(item)` is the VolumeName."""
    return [x for x in items if shard_of(key(x), num_shards) == shard_index]


def shard_path(path: str | Path, shard_index: int, num_shards: int) -> Path:
    """``dir/train.h5`` -> ``dir/train.shard-03-of-16.h5`` (zero-padded, so the names sort by shard)."""
    path = Path(path)
    width = len(str(num_shards))
    tag = f"shard-{shard_index:0{width}d}-of-{num_shards}"
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")

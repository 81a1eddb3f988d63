"""One precision vocabulary for every script: auto | bf16 | fp16 | fp32.

`none` and `off` are accepted as fp32 (the inference scripts' `--amp none`). `auto` means bf16
autocast on CUDA and fp32 on the CPU (CPU autocast is slower than fp32 for these models). Training in
fp16 needs CUDA and comes with a GradScaler.

    autocast, scaler = autocast_factory(cfg.precision, device)
    with autocast():
        loss = model(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
ALIASES: dict[str, str] = {"none": "fp32", "off": "fp32"}
CHOICES: tuple[str, ...] = (*PRECISIONS, *ALIASES)
_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(name: str, device: torch.device) -> str:
    """The concrete precision ('bf16', 'fp16' or 'fp32') that `name` means on `device`."""
    key = ALIASES.get(str(name), str(name))
    if key not in PRECISIONS:
        raise ValueError(f"precision {name!r}: expected one of {', '.join(CHOICES)}")
    if key == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return key


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    return _DTYPES[resolve_precision(name, device)]


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    """A function returning the autocast context for `dtype` on `device` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def autocast_factory(name: str, device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], Any]:
    """For training: (a function returning the autocast context, a GradScaler for fp16 or None).
    fp16 training needs CUDA (its GradScaler)."""
    dtype = autocast_dtype(name, device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device (got {device}); use bf16 or fp32")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return autocast_context(device, dtype), scaler

"""Whole-file writes: a reader sees the old file or the new one, never half of one.

    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")   # writers that read the suffix
    atomic_write_text(path, json.dumps(summary))

`write(tmp)` writes the complete file under a hidden temporary name in the same folder (so the rename is
atomic on POSIX file systems); the temporary file then replaces `path`. If `write` raises, the
temporary file is removed and `path` is left as it was. A process killed while writing leaves only a
hidden ``.<name>.partial-<pid>`` file beside the target.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def partial_path(path: Path, suffix: str = "") -> Path:
    """The temporary name `atomic_write` uses for `path` in this process."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}{suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], object], *, suffix: str = "") -> Path:
    """Write `path` whole through `write(tmp)`; `suffix` is appended to the temporary name for writers
    that choose the format from it (nibabel: ".nii.gz"). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

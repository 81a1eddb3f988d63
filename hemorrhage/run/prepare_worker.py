"""The prepare job's worker side: one task (the slices of one series) decoded, windowed and written as the
original's PNGs or one npz stack, in a pool process (run by `hemorrhage.run.prepare`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ctcore.atomic import atomic_write
from hemorrhage.dicom import DicomReadError
from hemorrhage.inputs import slice_image
from hemorrhage.windows import WindowSpec


def png_name(sop_uid: str) -> str:
    """The original's file name: ID_<SOPInstanceUID>.png (Kaggle IDs already start with ID_)."""
    return f"{sop_uid if sop_uid.startswith('ID_') else 'ID_' + sop_uid}.png"


def write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@dataclass(frozen=True)
class Task:
    """Slices of one series, in order; `npz` set in npz mode, else each slice has its PNG path."""

    paths: tuple[str, ...]
    pngs: tuple[str, ...] = ()
    npz: str = ""
    compress: bool = False  # npz: deflate the stack
    sop_uids: tuple[str, ...] = ()
    study_uid: str = ""
    series_uid: str = ""
    positions: tuple[float, ...] = ()


@dataclass(frozen=True)
class SliceResult:
    path: str
    quirk_fixed: bool = False
    error: str = ""
    stage: str = "pixels"
    window_fallback: bool = False  # header mode, no usable header window: DEFAULT_WINDOW was used


def run_task(task: Task, spec: WindowSpec, fix_quirk: bool) -> list[SliceResult]:
    """Decode, window and write the slices of `task` (runs in a worker process)."""
    results: list[SliceResult] = []
    images: list[np.ndarray] = []
    kept: list[int] = []
    for k, path in enumerate(task.paths):
        try:
            h, img, fixed = slice_image(path, spec, fix_quirk)
        except DicomReadError as e:
            results.append(SliceResult(path, error=e.reason))
            continue
        fallback = spec.falls_back(h.window_center, h.window_width)
        if task.npz:
            if images and img.shape != images[0].shape:
                why = f"image {img.shape} differs from the series' {images[0].shape}"
                results.append(SliceResult(path, error=why))
                continue
            images.append(img)
            kept.append(k)
        else:
            ok, buf = cv2.imencode(".png", img)
            if not ok:
                results.append(SliceResult(path, error="cv2 could not encode the PNG", stage="write"))
                continue
            write_atomic(Path(task.pngs[k]), buf.tobytes())
        results.append(SliceResult(path, fixed, window_fallback=fallback))
    if task.npz:
        fixed_flags = [r.quirk_fixed for r in results if not r.error]
        save_series_npz(task, kept, images, fixed_flags, spec)
    return results


def save_series_npz(task: Task, kept: list[int], images: list[np.ndarray], fixed: list[bool], spec: WindowSpec
                    ) -> None:
    """One series' stack through a temporary name; a series without any readable slice leaves no file."""
    out = Path(task.npz)
    if not images:
        out.unlink(missing_ok=True)  # an older stack of other slices must not pass for this series
        return
    save = np.savez_compressed if task.compress else np.savez  # plain: loading is a copy, not an inflate
    stack = np.stack(images)
    if stack.ndim == 4:  # three windows: (N, 3, H, W), the layout hemorrhage.inference_data.load_images reads
        stack = np.ascontiguousarray(np.moveaxis(stack, -1, 1))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            save(f, images=stack, sop_uids=np.array([task.sop_uids[k] for k in kept]),
                 positions=np.array([task.positions[k] for k in kept], np.float64), quirk_fixed=np.array(fixed),
                 study_uid=np.array(task.study_uid), series_uid=np.array(task.series_uid),
                 window=np.array(spec.describe()))
    atomic_write(out, write)

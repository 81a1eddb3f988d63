"""What inference reads: series of slices from a DICOM tree or a prepared folder, as uint8 model inputs.

    jobs, info = find_series("data/dicoms", num_workers=8)          # DICOM tree, or a prepared folder
    ds = SeriesInputs(jobs, InputSettings(spec, sizes=(256, 512), tta=parse_tta("0")))
    item = ds[0]    # {"index", "kept", "quirk", "window_fallback", "errors",
                    #  "inputs": {256: uint8 (P, S, 3, 256, 256), ...}}

One item is one series, decoded, windowed and resized in a DataLoader worker: the three-slice input
needs a slice's neighbours, and a series is the unit that has them. Images stay uint8 until the model
normalises them on the device.

Per model input size the original test-time recipe is kept (`hemorrhage.inputs.model_inputs`: the
two-step resize, ``[s+1, s, s-1]``, then the centre crop or the random TTA passes); the 512 x 512 grid
step is done once per series here, whatever the number of sizes.

A prepared folder is one that ``scripts/hemorrhage_prepare.py`` wrote (``manifest.csv`` and
``prepare_config.yaml``): its PNG or npz images are already windowed, so ``--window`` does not apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import Dataset

from hemorrhage.dicom import DicomReadError
from hemorrhage.inputs import InputSettings, model_inputs, slice_image, to_stack_grid
from hemorrhage.series import EXCLUDING, Discovery, discover

log = logging.getLogger(__name__)


class InputError(ValueError):
    """The input folder cannot be used (missing, empty, an unusable prepared folder)."""


# ----------------------------------------------------------------------------------------- series


@dataclass
class SeriesJob:
    """One series to predict: its slices in order and where their images are."""

    study_uid: str
    series_uid: str
    sop_uids: list[str]
    positions: list[float]  # mm along the slice normal; NaN where unknown
    slice_flags: list[str]  # ";"-joined flags per slice (see hemorrhage.series)
    paths: list[str]  # per slice: a DICOM file or a PNG
    kind: str  # "dicom" | "png" | "npz"
    ordered_by: str = "position"
    npz: str = ""  # kind npz: the series' stack
    window_fallback: list[bool] = field(default_factory=list)  # prepared: per slice, from the manifest (or empty)

    @property
    def n_slices(self) -> int:
        return len(self.sop_uids)


@dataclass
class SourceInfo:
    kind: str  # "dicom" | "prepared"
    root: Path
    window: str = ""  # prepared: the window the images were made with
    discovery: Discovery | None = None
    left_out: dict[str, int] = field(default_factory=dict)  # flag -> files left out
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, stage, error)
    n_files: int = 0


def is_prepared_folder(root: Path) -> bool:
    return (root / "manifest.csv").is_file() and (root / "prepare_config.yaml").is_file()


def jobs_from_discovery(d: Discovery) -> list[SeriesJob]:
    jobs = []
    for s in d.series:
        if not s.slices:
            continue
        jobs.append(SeriesJob(
            s.study_uid, s.series_uid, [e.header.sop_uid for e in s.slices],
            [np.nan if e.position is None else float(e.position) for e in s.slices],
            [";".join(e.flags) for e in s.slices], [e.header.path for e in s.slices], "dicom", s.ordered_by))
    return jobs


def jobs_from_prepared(root: Path) -> tuple[list[SeriesJob], SourceInfo]:
    """Series of a folder written by hemorrhage_prepare.py, in its manifest's order."""
    settings = yaml.safe_load((root / "prepare_config.yaml").read_text()) or {}
    fmt = settings.get("format", "png")
    m = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    need = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "order", "included", "flags",
            "output", "position", "path", "ordered_by"}
    missing = sorted(need - set(m.columns))
    if missing:
        raise InputError(f"{root / 'manifest.csv'}: missing column(s) {', '.join(missing)}; was it written by "
                         "hemorrhage_prepare.py?")
    info = SourceInfo("prepared", root, window=str(settings.get("window", "")), n_files=len(m))
    left = m[m["included"] != "1"]
    for flags in left["flags"]:
        for f in filter(None, flags.split(";")):
            info.left_out[f] = info.left_out.get(f, 0) + 1
    usable = m[(m["included"] == "1") & (m["output"] != "")].copy()
    if (root / "errors.csv").is_file():  # files the prepare run could not use, reported again here
        errs = pd.read_csv(root / "errors.csv", dtype=str, keep_default_na=False)
        info.errors += [(r.path, f"prepare:{r.stage}", r.error) for r in errs.itertuples()]
    usable["order_i"] = usable["order"].astype(int)
    jobs = []
    for (study, series), g in usable.groupby(["StudyInstanceUID", "SeriesInstanceUID"], sort=False):
        g = g.sort_values("order_i")
        positions = [float(p) if p else np.nan for p in g["position"]]
        outputs = [str(root / o) for o in g["output"]]
        fallback = (g["window_fallback"] == "1").tolist() if "window_fallback" in g.columns else []  # older runs
        jobs.append(SeriesJob(study, series, g["SOPInstanceUID"].tolist(), positions, g["flags"].tolist(),
                              outputs, "npz" if fmt == "npz" else "png", g["ordered_by"].iloc[0],
                              npz=outputs[0] if fmt == "npz" else "", window_fallback=fallback))
    return jobs, info


def find_series(root: str | Path, num_workers: int = 0, progress: bool = True) -> tuple[list[SeriesJob], SourceInfo]:
    """Series to predict under `root`: a prepared folder, else a DICOM tree (headers read, series ordered)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--data_dir {root}: no such folder")
    if is_prepared_folder(root):
        jobs, info = jobs_from_prepared(root)
    else:
        if any(root.glob("*.png")) or (root / "png").is_dir():
            log.warning("%s holds PNGs but no manifest.csv: without it the slice order is unknown, so they are "
                        "not used; prepare with scripts/hemorrhage_prepare.py or give the DICOM folder", root)
        d = discover(root, num_workers=num_workers, progress=progress)
        info = SourceInfo("dicom", root, discovery=d, n_files=d.n_files,
                          errors=[(e.path, e.stage, e.error) for e in d.errors],
                          left_out={k: v for k, v in d.flag_counts.items() if k in EXCLUDING})
        jobs = jobs_from_discovery(d)
    if not jobs:
        left = ", ".join(f"{k} {v}" for k, v in sorted(info.left_out.items())) or "none"
        raise InputError(f"--data_dir {root}: no CT series to predict ({info.n_files} files, "
                         f"{len(info.errors)} unreadable, left out: {left})")
    return jobs, info


# ----------------------------------------------------------------------------------------- images -> inputs


def _read_png(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DicomReadError(path, "missing or unreadable PNG")
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise DicomReadError(path, f"expected an 8-bit grey or 3-channel PNG, got {img.dtype} {img.shape}")
    return img


@dataclass
class LoadedSeries:
    """The readable slices of one series, windowed, and what happened to each."""

    images: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W) or (H, W, 3)
    kept: list[int] = field(default_factory=list)  # indices into the job's slices
    quirk: list[bool] = field(default_factory=list)  # the BitsStored-12 fix touched it
    window_fallback: list[bool] = field(default_factory=list)  # no header window: brain 40/80 instead
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, stage, error) of the others


def _prepared_fallback(job: SeriesJob, i: int) -> bool:
    return bool(job.window_fallback[i]) if job.window_fallback else False


def load_images(job: SeriesJob, s: InputSettings) -> LoadedSeries:
    """Windowed uint8 images of the slices of `job` that could be read (see `LoadedSeries`).

    The window fallback of a prepared folder is the one its manifest records (``window_fallback``)."""
    out = LoadedSeries()
    if job.kind == "npz":
        try:
            with np.load(job.npz, allow_pickle=False) as z:
                stack, sops = z["images"], z["sop_uids"].tolist()
        except (OSError, ValueError, KeyError) as e:
            out.errors.append((job.npz, "pixels", f"unreadable npz stack: {type(e).__name__}: {e}"))
            return out
        if sops != job.sop_uids:
            out.errors.append((job.npz, "pixels", "the npz stack holds other slices than the manifest lists"))
            return out
        if stack.ndim == 4:
            stack = np.moveaxis(stack, 1, -1)  # (N, 3, H, W) -> (N, H, W, 3)
        n = len(stack)
        return LoadedSeries(list(stack), list(range(n)), [False] * n,
                            [_prepared_fallback(job, i) for i in range(n)])
    for i, path in enumerate(job.paths):
        try:
            if job.kind == "png":
                img, fixed, fallback = _read_png(path), False, _prepared_fallback(job, i)
            else:
                h, img, fixed = slice_image(path, s.spec, s.fix_quirk)
                fallback = s.spec.falls_back(h.window_center, h.window_width)
        except DicomReadError as e:
            out.errors.append((path, "pixels", e.reason))
            continue
        out.images.append(img)
        out.kept.append(i)
        out.quirk.append(fixed)
        out.window_fallback.append(fallback)
    return out


class SeriesInputs(Dataset):
    """A map-style dataset of whole series (use with ``batch_size=None``)."""

    def __init__(self, jobs: list[SeriesJob], settings: InputSettings) -> None:
        self.jobs, self.settings = jobs, settings

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict:
        job, s = self.jobs[index], self.settings
        got = load_images(job, s)
        if len({img.ndim for img in got.images}) > 1:  # grey and three-window images: a corrupt prepared folder
            mixed = (job.paths[0], "pixels", "the series mixes grey and three-window images")
            got = LoadedSeries(errors=[*got.errors, mixed])
        grid = [to_stack_grid(img) for img in got.images]  # once, whatever the number of input sizes
        inputs = {size: torch.from_numpy(model_inputs(grid, size, s, job.series_uid)) for size in s.sizes} \
            if grid else {}
        return {"index": index, "kept": torch.as_tensor(got.kept, dtype=torch.long),
                "quirk": torch.as_tensor(got.quirk, dtype=torch.bool),
                "window_fallback": torch.as_tensor(got.window_fallback, dtype=torch.bool), "errors": got.errors,
                "inputs": inputs}


def identity_collate(item: dict) -> dict:
    return item

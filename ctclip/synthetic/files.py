"""Files of a synthetic CT-RATE set: layout, atomic NIfTI/CSV/JSON writes, finding masks and reading them back.

    DIR/volumes/<split>/<split>_<pid>/<split>_<pid>_<scan>/<VolumeName>      `volume_path`
    DIR/masks/<VolumeName>     uint32, bit k set where FINDINGS[k] was planted   `load_finding_masks`
    DIR/{train,validation}_{metadata,reports}.csv, DIR/{train,valid}_predicted_labels.csv   `SPLITS`
    DIR/synthetic_info.json    `INFO_FILE`

Every file is written under a hidden temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctclip.findings import FINDINGS, finding_index
from ctclip.synthetic.config import ChestSynthConfig
from ctclip.synthetic.planters import PLANTABLE
from ctclip.synthetic.volume import SyntheticVolume
from ctcore.atomic import atomic_write, atomic_write_text

SPLITS = {
    "train": ("train_metadata.csv", "train_reports.csv", "train_predicted_labels.csv"),
    "valid": ("validation_metadata.csv", "validation_reports.csv", "valid_predicted_labels.csv"),
}
INFO_FILE = "synthetic_info.json"


def reorient(arr: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS array + affine -> the same image stored with axis codes `code` (affine stays correct)."""
    ornt = nib.orientations
    tr = ornt.ornt_transform(ornt.axcodes2ornt(("R", "A", "S")), ornt.axcodes2ornt(tuple(code)))
    return ornt.apply_orientation(arr, tr), affine @ ornt.inv_ornt_aff(tr, arr.shape)


def save_nifti_atomic(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write to a hidden temporary name, then rename: an interrupted run never leaves a half file."""
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(np.nan, np.nan)  # no NIfTI scaling: values on disk are what you get
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


def masks_to_bits(masks: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    bits = np.zeros(shape, dtype=np.uint32)
    for name, m in masks.items():
        bits[m] |= np.uint32(1 << finding_index(name))
    return bits


def load_finding_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Read a `masks/<VolumeName>` file: finding -> bool array (on-disk orientation), one per finding."""
    bits = np.asarray(nib.load(path).dataobj).astype(np.uint32)
    return {name: (bits & np.uint32(1 << k)) > 0 for k, name in enumerate(FINDINGS)}


def volume_path(out_dir: Path, name: str) -> Path:
    split, pid, scan, _ = name.removesuffix(".nii.gz").split("_")
    return out_dir / "volumes" / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def prepare_out_dir(cfg: ChestSynthConfig) -> None:
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ValueError(
                f"out_dir {out} exists and is not empty; pass --overwrite to replace its synthetic data"
            )
        for sub in ("volumes", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for f in [*(f for files in SPLITS.values() for f in files), INFO_FILE]:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_volume(
    cfg: ChestSynthConfig, name: str, vol: SyntheticVolume, intercept: int, code: str
) -> tuple[np.ndarray, tuple]:
    """Store one volume (variant, orientation `code`) and its finding mask; return on-disk affine, shape."""
    stored = vol.hu if cfg.variant == "hu" else (vol.hu.astype(np.int32) - intercept).astype(np.int16)
    arr, affine = reorient(stored, vol.affine, code)
    path = volume_path(cfg.out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti_atomic(arr, affine, path)
    (cfg.out_dir / "masks").mkdir(exist_ok=True)
    bits, _ = reorient(masks_to_bits(vol.finding_masks, vol.hu.shape), vol.affine, code)
    save_nifti_atomic(bits, affine, cfg.out_dir / "masks" / name)
    return affine, arr.shape


def write_info(cfg: ChestSynthConfig, base_volume: str, volumes: list[dict], seconds: float) -> None:
    """Write `INFO_FILE`: variant, resolved config, base volume, mask bits, timing, per-volume details."""
    from ctcore.cli import resolved

    info = {
        "variant": cfg.variant,
        "variant_meaning": {
            "raw": "stored = HU - RescaleIntercept (apply the metadata CSV)",
            "hu": "stored = HU (do not apply the metadata CSV)",
        }[cfg.variant],
        "config": resolved(cfg),
        "base_volume": base_volume,
        "plantable": list(PLANTABLE),
        "mask_bits": {name: 1 << k for k, name in enumerate(FINDINGS)},
        "seconds": round(seconds, 2),
        "volumes": volumes,
    }
    atomic_write_text(cfg.out_dir / INFO_FILE, json.dumps(info, indent=1, default=float))

"""Deciding how stored NIfTI values become Hounsfield units, without ever scaling twice.

CT-RATE's metadata CSV lists RescaleSlope/RescaleIntercept (1 and -1024 or -8192), but the current
release already stores HU in the NIfTI files: applying the CSV values again shifts every voxel by
-1024 or -8192 HU. The decision is made per volume from evidence and recorded with the volume.

Modes (``--rescale``):
- ``csv``: HU = raw * RescaleSlope + RescaleIntercept from the metadata row (required; it fails
  without a valid row). The header's own scaling is ignored: the CSV is taken to describe raw values.
- ``none``: the values are HU as the NIfTI header defines them (raw * scl_slope + scl_inter).
- ``auto`` (default):
  1. the header carries its own scaling (scl_slope/scl_inter not 1/0): apply it, never the CSV;
  2. otherwise find, from the values, the offset that makes them look like a chest CT: every chest
     CT has fat (-150..-50 HU) and aerated lung (-900..-700 HU), and for each candidate intercept
     (0, -1024, -8192) we count the voxels that land in those two windows. Air is deliberately not
     used: the padding outside the circular field of view (-2048 or -3024 HU, often noisy after
     resampling) stored raw with intercept -1024 sits right on the HU of air and fools any
     air-based test. Intercept 0 winning means the values are HU as stored;
  3. otherwise the values are raw: apply the CSV row; without a usable row, apply the intercept
     the evidence picked, and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

RescaleMode = Literal["auto", "csv", "none"]
KNOWN_INTERCEPTS = (-1024.0, -8192.0)
CANDIDATE_INTERCEPTS = (0.0, *KNOWN_INTERCEPTS)
FAT_HU = (-150.0, -50.0)
LUNG_HU = (-900.0, -700.0)


@dataclass(frozen=True)
class HUMapping:
    slope: float
    intercept: float
    source: str  # "csv" | "nifti" | "none" (stored values are HU) | "guess"
    reason: str

    def apply(self, raw: np.ndarray, out_dtype: type = np.float32) -> np.ndarray:
        out = raw.astype(out_dtype)
        if self.slope != 1.0:
            out *= out_dtype(self.slope)
        if self.intercept != 0.0:
            out += out_dtype(self.intercept)
        return out


@dataclass(frozen=True)
class CsvRescale:
    slope: float
    intercept: float

    @property
    def valid(self) -> bool:
        return math.isfinite(self.slope) and math.isfinite(self.intercept) and self.slope != 0


class RescaleError(ValueError):
    pass


def chest_evidence(values: np.ndarray, max_samples: int = 500_000) -> dict[float, float]:
    """For each candidate intercept, the share of voxels that would fall in the fat or lung windows.
    Computed on a strided sample of at most `max_samples` voxels (exact enough, much cheaper)."""
    flat = values.reshape(-1, order="A")
    sample = flat[:: max(1, flat.size // max_samples)].astype(np.float32)
    out = {}
    for c in CANDIDATE_INTERCEPTS:
        v = sample + np.float32(c)
        hits = ((v >= FAT_HU[0]) & (v <= FAT_HU[1])) | ((v >= LUNG_HU[0]) & (v <= LUNG_HU[1]))
        out[c] = float(hits.mean())
    return out


def decide_hu_mapping(
    raw: np.ndarray,
    scl_slope: float,
    scl_inter: float,
    csv: CsvRescale | None,
    mode: RescaleMode = "auto",
) -> HUMapping:
    """How to turn `raw` (stored values) into HU. Raises RescaleError when `mode` cannot be honoured."""
    if mode == "csv":
        if csv is None:
            raise RescaleError("--rescale csv: no metadata row for this volume")
        if not csv.valid:
            raise RescaleError(f"--rescale csv: invalid RescaleSlope/RescaleIntercept {csv.slope}/{csv.intercept}")
        return HUMapping(csv.slope, csv.intercept, "csv", "forced by --rescale csv")
    if mode == "none":
        return HUMapping(scl_slope, scl_inter, "none", "forced by --rescale none (header scaling only)")
    if mode != "auto":
        raise RescaleError(f"unknown rescale mode {mode!r}")

    if (scl_slope, scl_inter) != (1.0, 0.0):
        reason = f"NIfTI header has its own scaling {scl_slope:g}/{scl_inter:g}"
        if csv is not None:
            reason += f"; CSV {csv.slope:g}/{csv.intercept:g} not applied"
        return HUMapping(scl_slope, scl_inter, "nifti", reason)
    evidence = chest_evidence(raw)
    best = max(evidence, key=evidence.get)
    shown = ", ".join(f"{c:g}: {100 * s:.1f}%" for c, s in evidence.items())
    if best == 0.0:
        reason = f"stored values already HU (fat/lung share by intercept {shown})"
        if csv is not None:
            reason += f"; CSV intercept {csv.intercept:g} not applied"
        return HUMapping(1.0, 0.0, "none", reason)
    if csv is not None and csv.valid:
        note = "" if csv.intercept == best else f"; note: the values suggested intercept {best:g}"
        return HUMapping(csv.slope, csv.intercept, "csv", f"stored values are raw ({shown}); CSV applied{note}")
    why = "no metadata row" if csv is None else f"invalid metadata {csv.slope}/{csv.intercept}"
    return HUMapping(1.0, best, "guess", f"stored values are raw ({shown}), {why}: intercept {best:g} applied")

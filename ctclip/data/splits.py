"""Patients in CT-RATE volume names, and the closest whole-patient subset (used by the patient-wise split,
`ctclip.run.split`, and by the impressions job)."""

from __future__ import annotations

import re

import numpy as np

from ctcore.errors import UsageError

VOLUME_RE = re.compile(r"^(?P<split>[A-Za-z]+)_(?P<pid>\d+)_(?P<scan>[A-Za-z0-9]+)_(?P<recon>\d+)\.nii(\.gz)?$")


class SplitError(UsageError):
    pass


def patient_of(volume_name: str) -> str:
    m = VOLUME_RE.match(volume_name)
    if not m:
        raise SplitError(f"VolumeName {volume_name!r} does not follow <split>_<patient>_<scan>_<recon>.nii.gz")
    return f"{m['split']}_{m['pid']}"


def closest_subset(counts: list[int], target: int) -> list[int]:
    """Indices of items whose counts sum closest to `target` (ties: the smaller sum), preferring
    items earlier in the list. Dynamic programming over reachable sums; O(n * total)."""
    total = sum(counts)
    first = np.full(total + 1, -1, dtype=np.int64)  # item that first reached each sum
    reach = np.zeros(total + 1, dtype=bool)
    reach[0] = True
    for i, c in enumerate(counts):
        newly = np.zeros_like(reach)
        newly[c:] = reach[:-c] if c else reach
        newly &= ~reach
        first[newly] = i
        reach |= newly
    sums = np.flatnonzero(reach)
    best = int(sums[np.argmin(np.abs(sums - target) * 2 + (sums > target))])
    chosen, s = [], best
    while s > 0:
        i = int(first[s])
        chosen.append(i)
        s -= counts[i]
    return sorted(chosen)


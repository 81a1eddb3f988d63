"""Image augmentations of the RSNA 2019 first-place 2D CNNs, for training and test-time augmentation.

    rng = rng_for(0, series_uid, pass_index)      # reproducible, independent of worker and hash seed
    x = center_crop_resize(image)                 # uint8 (H, W, 3) -> same shape: every inference image
    x = augment_tta(image, rng)                   # one random TTA pass
    x = augment_train(image, rng, AugmentConfig())

The models see uint8 (H, W, 3) images whose channels are three adjacent slices `[s+1, s, s-1]`
(channels last here, cv2's convention). We keep the original's augmentations exactly, because its
checkpoints were trained and scored with them:
- every inference image (and validation) is centre-cropped to 0.8 of each side (`int(side * 0.8)`,
  start `(side - target) // 2`) and resized back with cv2 bilinear;
- random crop: ratio ~ U(0.6, 0.99), `int(side * ratio)`, start uniform over every valid integer
  (inclusive), bilinear resize back;
- horizontal flip (cv2.flip 1); channel reversal (the original's BGR2RGB: `[s-1, s, s+1]`);
- shift-scale-rotate: angle U(-30, 30) deg, scale and aspect U(0.9, 1.1), shift U(-0.1, 0.1) of each
  side rounded to pixels; the corners, centred, go through `[[cos*sx, -sin*sy], [sin*sy, cos*sx]]`
  (the original's matrix, not quite rotation times scaling when aspect != 1) and the perspective
  warp between old and new corners is applied with zero fill; a positive angle turns the image
  clockwise on screen (rows grow downwards);
- random erasing: up to 100 tries of area U(0.02, 0.4) and aspect U(0.3, 1/0.3), zeroing the first
  rectangle that fits strictly inside;
- training: reversal p 0.5, hflip p 0.5, shift-scale-rotate p 0.5, erasing p 0.5, random crop always;
  TTA pass: reversal p 0.5, hflip p 0.5, random crop always (the original averaged 10 such passes).
`AUGMENT_PRESETS` names the original's settings ("original") and a lighter set for tiny runs ("light").
Every draw comes from an explicit `numpy.random.Generator` (`rng_for` derives one per key), never the
global state, so DataLoader workers and repeated runs give the same images. Each probability gate
draws once whatever `p` is, so changing one p leaves the other draws of a pass unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import cv2
import numpy as np


def _check(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy image, got {getattr(img, 'dtype', type(img))}")
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    return np.ascontiguousarray(img)


def _check_range(name: str, lo: float, hi: float) -> None:
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got ({lo}, {hi})")


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability must be in [0, 1], got {p}")


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator fixed by (seed, keys) through sha256: the same in every process and hash seed."""
    parts = [seed, *keys]
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int, np.integer)):
            raise ValueError(f"rng_for keys must be str or int, got {part!r}")
    text = json.dumps([p if isinstance(p, str) else int(p) for p in parts])  # "1" and 1 stay apart
    entropy = int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
    return np.random.default_rng(np.random.SeedSequence(entropy))


def seed_for(seed: int, *keys: str | int) -> int:
    """An integer seed fixed by (seed, keys), from `rng_for`: e.g. for a torch.Generator."""
    return int(rng_for(seed, *keys).integers(2**62))


def crop_resize(img: np.ndarray, ratio: float, start_x: int, start_y: int) -> np.ndarray:
    """Crop `int(side * ratio)` from (start_y, start_x) and resize back to (H, W), cv2 bilinear."""
    img = _check(img)
    h, w = img.shape[:2]
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    th, tw = int(h * ratio), int(w * ratio)
    if th < 1 or tw < 1:
        raise ValueError(f"crop ratio {ratio} leaves nothing of a {h}x{w} image")
    if not (0 <= start_x <= w - tw and 0 <= start_y <= h - th):
        raise ValueError(f"crop start ({start_y}, {start_x}) outside [0, {h - th}] x [0, {w - tw}]")
    crop = img[start_y : start_y + th, start_x : start_x + tw]
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR).reshape(img.shape)


def center_crop_resize(img: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """The original's inference crop: centred `int(side * ratio)` window, resized back."""
    h, w = _check(img).shape[:2]  # crop_resize validates the ratio
    return crop_resize(img, ratio, (w - int(w * ratio)) // 2, (h - int(h * ratio)) // 2)


def random_crop_resize(
    img: np.ndarray, rng: np.random.Generator, ratio_range: tuple[float, float] = (0.6, 0.99)
) -> np.ndarray:
    """Ratio ~ U(ratio_range), start uniform over every valid integer (inclusive), resized back."""
    img = _check(img)
    _check_range("ratio_range", *ratio_range)
    h, w = img.shape[:2]
    ratio = float(rng.uniform(*ratio_range))
    start_x = int(rng.integers(0, w - int(w * ratio), endpoint=True))
    start_y = int(rng.integers(0, h - int(h * ratio), endpoint=True))
    return crop_resize(img, ratio, start_x, start_y)


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror the columns (cv2.flip code 1)."""
    return cv2.flip(_check(img), 1).reshape(img.shape)


def reverse_channels(img: np.ndarray) -> np.ndarray:
    """Slices [s+1, s, s-1] -> [s-1, s, s+1] (the original's BGR2RGB on the 3-slice image)."""
    if _check(img).ndim != 3:
        raise ValueError(f"channel reversal needs an (H, W, C) image, got shape {img.shape}")
    return np.ascontiguousarray(img[:, :, ::-1])


def shift_scale_rotate(
    img: np.ndarray, angle_deg: float, scale: float, aspect: float, dx: int, dy: int
) -> np.ndarray:
    """The original's corner-based perspective warp (see the module docstring), zero fill."""
    img = _check(img)
    if scale <= 0 or aspect <= 0:
        raise ValueError(f"scale and aspect must be positive, got {scale}, {aspect}")
    h, w = img.shape[:2]
    sx, sy = scale * aspect / math.sqrt(aspect), scale / math.sqrt(aspect)
    a = math.radians(angle_deg)
    cc, ss = math.cos(a) * sx, math.sin(a) * sy
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    centre = np.array([w / 2, h / 2])
    moved = (corners - centre) @ np.array([[cc, -ss], [ss, cc]]).T + centre + np.array([dx, dy])
    mat = cv2.getPerspectiveTransform(corners.astype(np.float32), moved.astype(np.float32))
    out = cv2.warpPerspective(
        img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return out.reshape(img.shape)


def random_shift_scale_rotate(
    img: np.ndarray,
    rng: np.random.Generator,
    p: float = 0.5,
    shift: float = 0.1,
    scale: float = 0.1,
    aspect: float = 0.1,
    rotate: float = 30.0,
) -> np.ndarray:
    """With probability p: shift_scale_rotate with the original's draws; otherwise a copy."""
    img = _check(img)
    _check_p(p)
    if rng.random() >= p:
        return img.copy()
    h, w = img.shape[:2]
    angle = rng.uniform(-rotate, rotate)
    s = rng.uniform(1 - scale, 1 + scale)
    asp = rng.uniform(1 - aspect, 1 + aspect)
    dx = int(round(rng.uniform(-shift, shift) * w))  # Python's round (half to even), as the original
    dy = int(round(rng.uniform(-shift, shift) * h))
    return shift_scale_rotate(img, angle, s, asp, dx, dy)


def random_erasing(
    img: np.ndarray,
    rng: np.random.Generator,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: float = 0.3,
) -> np.ndarray:
    """With probability p, zero one rectangle (area fraction ~ U(area), aspect ~ U(ratio, 1/ratio))."""
    out = _check(img).copy()
    _check_range("area", *area)
    _check_p(p)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"erasing ratio must be in (0, 1], got {ratio}")
    if rng.random() >= p:
        return out
    h, w = out.shape[:2]
    for _ in range(100):
        target = rng.uniform(*area) * h * w
        aspect_ratio = rng.uniform(ratio, 1 / ratio)
        eh = int(round(math.sqrt(target * aspect_ratio)))
        ew = int(round(math.sqrt(target / aspect_ratio)))
        if ew < w and eh < h:
            row = int(rng.integers(0, h - eh, endpoint=True))
            col = int(rng.integers(0, w - ew, endpoint=True))
            out[row : row + eh, col : col + ew] = 0
            break
    return out


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation probabilities and limits; the defaults are the original's."""

    p_reverse: float = 0.5
    p_hflip: float = 0.5
    p_shift_scale_rotate: float = 0.5
    shift_limit: float = 0.1
    scale_limit: float = 0.1
    aspect_limit: float = 0.1
    rotate_limit: float = 30.0
    p_erase: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.4)
    erase_ratio: float = 0.3
    crop_ratio: tuple[float, float] = (0.6, 0.99)

    def __post_init__(self) -> None:
        for name in ("p_reverse", "p_hflip", "p_shift_scale_rotate", "p_erase"):
            _check_p(getattr(self, name))
        if not (0 <= self.shift_limit and 0 <= self.scale_limit < 1 and 0 <= self.aspect_limit < 1):
            raise ValueError("shift_limit must be >= 0, scale_limit and aspect_limit in [0, 1)")
        _check_range("erase_area", *self.erase_area)
        _check_range("crop_ratio", *self.crop_ratio)
        if not 0.0 < self.erase_ratio <= 1.0:
            raise ValueError(f"erase_ratio must be in (0, 1], got {self.erase_ratio}")


# Named training augmentations: TrainConfig.augment, or a model's default (`CNNSpec.train_augment`).
# "original" is the first-place recipe, regularisation sized for 80 epochs over ~17k studies. "light" keeps
# channel reversal, flip and a random crop around the inference crop's 0.8, and drops the warp and the
# erasing (which can also hide a small bleed while its label stays 1): the tiny test run (~8k images of
# 64 px) fits too little under them, and its held-out loss was no better than the prevalence prior.
AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "original": AugmentConfig(),
    "light": AugmentConfig(p_shift_scale_rotate=0.0, p_erase=0.0, crop_ratio=(0.7, 0.9)),
}


def augment_preset(name: str) -> AugmentConfig:
    """The AugmentConfig of a named preset (`AUGMENT_PRESETS`); ValueError naming the known ones."""
    try:
        return AUGMENT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown augmentation preset {name!r}; known: {', '.join(AUGMENT_PRESETS)}") from None


def _reverse_flip(img: np.ndarray, rng: np.random.Generator, p_reverse: float, p_hflip: float) -> np.ndarray:
    img = _check(img)
    _check_p(p_reverse)
    _check_p(p_hflip)
    if img.ndim != 3 and p_reverse > 0:  # fail on every call, not only when the draw says reverse
        raise ValueError(f"p_reverse={p_reverse} needs an (H, W, C) image, got shape {img.shape}")
    if rng.random() < p_reverse:
        img = reverse_channels(img)
    if rng.random() < p_hflip:
        img = hflip(img)
    return img


def augment_train(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None) -> np.ndarray:
    """Reversal, hflip, shift-scale-rotate, erasing, then random crop + resize (the original's order)."""
    c = cfg if cfg is not None else AugmentConfig()
    img = _reverse_flip(img, rng, c.p_reverse, c.p_hflip)
    img = random_shift_scale_rotate(
        img, rng, c.p_shift_scale_rotate, c.shift_limit, c.scale_limit, c.aspect_limit, c.rotate_limit
    )
    img = random_erasing(img, rng, c.p_erase, c.erase_area, c.erase_ratio)
    return random_crop_resize(img, rng, c.crop_ratio)


def augment_tta(
    img: np.ndarray,
    rng: np.random.Generator,
    p_reverse: float = 0.5,
    p_hflip: float = 0.5,
    ratio_range: tuple[float, float] = (0.6, 0.99),
) -> np.ndarray:
    """One random TTA pass of the original: reversal, hflip, random crop + resize; no warp or erasing."""
    img = _reverse_flip(img, rng, p_reverse, p_hflip)
    return random_crop_resize(img, rng, ratio_range)

"""hemorrhage.augment: the first-place augmentations, checked against independent oracles."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hemorrhage.augment import (
    AugmentConfig,
    augment_train,
    augment_tta,
    center_crop_resize,
    crop_resize,
    hflip,
    random_crop_resize,
    random_erasing,
    random_shift_scale_rotate,
    reverse_channels,
    rng_for,
    shift_scale_rotate,
)

ROOT = Path(__file__).resolve().parents[1]
NO_RANDOM = AugmentConfig(p_reverse=0, p_hflip=0, p_shift_scale_rotate=0, p_erase=0, crop_ratio=(1, 1))


def noise(h: int = 48, w: int = 64, c: int | None = 3, seed: int = 0, low: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(low, 256, shape, dtype=np.uint8)


def coordinate_image(h: int = 30, w: int = 40) -> np.ndarray:
    """Channel 0 = 5 * column, channel 1 = 5 * row, channel 2 = 255: a crop's window can be read back."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([5 * cols, 5 * rows, np.full((h, w), 255)], axis=-1).astype(np.uint8)


def read_window(out: np.ndarray) -> tuple[int, int, int, int]:
    """(start_x, start_y, width, height) of the crop that produced `out` from coordinate_image.

    Bilinear resize clamps the first and last output pixel to the crop's first and last pixel, so
    the corners carry exact coordinates."""
    x0, x1 = int(out[0, 0, 0]) // 5, int(out[0, -1, 0]) // 5
    y0, y1 = int(out[0, 0, 1]) // 5, int(out[-1, 0, 1]) // 5
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


# ---- crops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 64, 3), (61, 37, 3), (50, 70)])
@pytest.mark.parametrize("ratio", [0.8, 0.55])
def test_center_crop_matches_oracle(shape, ratio):
    img = noise(*shape[:2], c=shape[2] if len(shape) == 3 else None)
    h, w = shape[:2]
    th, tw = int(h * ratio), int(w * ratio)
    y0, x0 = (h - th) // 2, (w - tw) // 2
    expected = cv2.resize(img[y0 : y0 + th, x0 : x0 + tw], (w, h))
    out = center_crop_resize(img, ratio)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, expected)


def test_center_crop_default_is_point_eight_and_ratio_one_is_identity():
    img = noise(61, 37)
    np.testing.assert_array_equal(center_crop_resize(img), center_crop_resize(img, 0.8))
    out = center_crop_resize(img, 1.0)
    np.testing.assert_array_equal(out, img)
    assert out is not img


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.01, 0.01])
def test_bad_crop_ratio_raises(ratio):
    with pytest.raises(ValueError):
        center_crop_resize(noise(), ratio)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((2, 8, 8, 3), np.uint8), [[1, 2]]])
def test_input_validation(bad):
    with pytest.raises(ValueError):
        hflip(bad)
    with pytest.raises(ValueError):
        center_crop_resize(bad)


def test_crop_resize_accepts_max_start_and_rejects_beyond():
    img = noise(30, 40)
    th, tw = int(30 * 0.7), int(40 * 0.7)
    out = crop_resize(img, 0.7, 40 - tw, 30 - th)
    np.testing.assert_array_equal(out, cv2.resize(img[30 - th :, 40 - tw :], (40, 30)))
    for sx, sy in [(40 - tw + 1, 0), (0, 30 - th + 1), (-1, 0)]:
        with pytest.raises(ValueError):
            crop_resize(img, 0.7, sx, sy)


def test_random_crop_starts_cover_inclusive_range():
    img = coordinate_image()
    tw, th = int(40 * 0.9), int(30 * 0.9)
    rng = np.random.default_rng(1)
    windows = {read_window(random_crop_resize(img, rng, (0.9, 0.9))) for _ in range(200)}
    assert {(w, h) for _, _, w, h in windows} == {(tw, th)}
    assert {x for x, _, _, _ in windows} == set(range(40 - tw + 1))
    assert {y for _, y, _, _ in windows} == set(range(30 - th + 1))


def test_random_crop_ratio_range_respected():
    img = coordinate_image()
    rng = np.random.default_rng(2)
    widths = []
    for _ in range(300):
        out = random_crop_resize(img, rng)
        x, y, w, h = read_window(out)
        np.testing.assert_array_equal(out, cv2.resize(img[y : y + h, x : x + w], (40, 30)))
        # some ratio in [0.6, 0.99] gives both int(40 r) == w and int(30 r) == h
        lo, hi = max(w / 40, h / 30, 0.6), min((w + 1) / 40, (h + 1) / 30, 0.99 + 1e-12)
        assert lo < hi, (w, h)
        widths.append(w)
    assert min(widths) <= 26  # the draws reach both ends of the range (24 and 39 columns)
    assert max(widths) >= 38


def test_random_crop_seeded():
    img = noise()
    a = random_crop_resize(img, np.random.default_rng(5))
    np.testing.assert_array_equal(a, random_crop_resize(img, np.random.default_rng(5)))
    assert not np.array_equal(a, random_crop_resize(img, np.random.default_rng(6)))


# ---- flips ---------------------------------------------------------------------------------------


def test_hflip_and_reverse_channels_exact():
    img = noise()
    np.testing.assert_array_equal(hflip(img), img[:, ::-1])
    np.testing.assert_array_equal(hflip(img[..., 0]), img[:, ::-1, 0])
    np.testing.assert_array_equal(hflip(img[..., :1]), img[:, ::-1, :1])
    rev = reverse_channels(img)
    np.testing.assert_array_equal(rev[..., 0], img[..., 2])
    np.testing.assert_array_equal(rev[..., 2], img[..., 0])
    np.testing.assert_array_equal(rev[..., 1], img[..., 1])
    assert rev.flags.c_contiguous
    with pytest.raises(ValueError):
        reverse_channels(img[..., 0])


# ---- shift / scale / rotate ----------------------------------------------------------------------


def test_shift_scale_rotate_identity_and_shapes():
    for img in (noise(), noise(c=None), noise(c=1)):
        out = shift_scale_rotate(img, 0.0, 1.0, 1.0, 0, 0)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - img).max() <= 1


def test_shift_scale_rotate_pure_shift():
    img = noise(low=1)
    out = shift_scale_rotate(img, 0.0, 1.0, 1.0, 5, -3)
    # content moves 5 columns right and 3 rows up; uncovered pixels are zero
    np.testing.assert_array_equal(out[:-3, 5:], img[3:, :-5])
    assert not out[:, :5].any() and not out[-3:].any()


def test_shift_scale_rotate_quarter_turn():
    n = 32
    img = noise(n, n, low=1)
    out = shift_scale_rotate(img, 90.0, 1.0, 1.0, 0, 0)
    # matrix [[0, -1], [1, 0]] about (n/2, n/2) in pixel-index coordinates: (x, y) -> (n - y, x),
    # i.e. out[r, c] = img[n - c, r]: a clockwise turn on screen, one column off np.rot90's grid
    rows, cols = np.mgrid[0:n, 1:n]
    np.testing.assert_array_equal(out[:, 1:], img[n - cols, rows])
    np.testing.assert_array_equal(out[:, 1:], np.rot90(img, k=-1)[:, :-1])
    assert not out[:, 0].any()
    dot = np.zeros((n, n), np.uint8)
    dot[3, 10] = 255  # top edge, left of centre -> right edge, upper half
    assert np.argwhere(shift_scale_rotate(dot, 90.0, 1.0, 1.0, 0, 0) == 255).tolist() == [[10, n - 3]]


def test_shift_scale_rotate_matches_rotation_matrix_oracle():
    img = noise()
    h, w = img.shape[:2]
    angle, scale, dx, dy = 17.3, 1.07, 4, -3
    m = cv2.getRotationMatrix2D((w / 2, h / 2), -angle, scale)  # cv2's positive angle is counter-clockwise
    m[:, 2] += (dx, dy)
    expected = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    out = shift_scale_rotate(img, angle, scale, 1.0, dx, dy)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_shift_scale_rotate_with_aspect_matches_affine_oracle():
    img = noise(seed=3)
    h, w = img.shape[:2]
    angle, scale, aspect, dx, dy = -24.0, 0.93, 1.08, -6, 2
    a = math.radians(angle)
    sx, sy = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
    lin = np.array([[math.cos(a) * sx, -math.sin(a) * sy], [math.sin(a) * sy, math.cos(a) * sx]])
    centre = np.array([w / 2, h / 2])
    m = np.hstack([lin, (centre + (dx, dy) - lin @ centre)[:, None]])
    expected = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    out = shift_scale_rotate(img, angle, scale, aspect, dx, dy)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_random_shift_scale_rotate_gate_and_seed():
    img = noise()
    np.testing.assert_array_equal(random_shift_scale_rotate(img, np.random.default_rng(0), p=0), img)
    a = random_shift_scale_rotate(img, np.random.default_rng(0), p=1)
    assert not np.array_equal(a, img)
    np.testing.assert_array_equal(a, random_shift_scale_rotate(img, np.random.default_rng(0), p=1))


# ---- random erasing ------------------------------------------------------------------------------


def test_random_erasing_rectangle():
    img = noise(64, 64, low=1)
    before = img.copy()
    for seed in range(200):
        out = random_erasing(img, np.random.default_rng(seed), p=1.0)
        zero = (out == 0).all(axis=-1)
        assert zero.any(), seed  # p=1 always erases on 64x64
        rows, cols = np.flatnonzero(zero.any(axis=1)), np.flatnonzero(zero.any(axis=0))
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        box = np.zeros_like(zero)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        np.testing.assert_array_equal(zero, box)
        np.testing.assert_array_equal(out[~box], img[~box])
        # h, w are the rounded sides of a target rectangle: |h w - area| <= (h + w) / 2 + 1/4
        slack = (h + w) / 2 + 0.25
        assert 0.02 * 64 * 64 - slack <= h * w <= 0.4 * 64 * 64 + slack
        assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
        assert h < 64 and w < 64
    np.testing.assert_array_equal(img, before)


def test_random_erasing_positions_cover_inclusive_range():
    img = noise(16, 16, low=1)
    rng = np.random.default_rng(9)
    corners = set()
    for _ in range(300):  # area 1/4 and aspect 1: always an 8x8 box, corner in [0, 8] x [0, 8]
        zero = (random_erasing(img, rng, p=1.0, area=(0.25, 0.25), ratio=1.0) == 0).all(axis=-1)
        assert zero.sum() == 64
        corners.add(tuple(np.argwhere(zero).min(axis=0).tolist()))
    assert {r for r, _ in corners} == set(range(9)) and {c for _, c in corners} == set(range(9))


def test_random_erasing_p_zero_and_2d():
    img = noise(64, 64, low=1)
    for seed in range(50):
        out = random_erasing(img, np.random.default_rng(seed), p=0.0)
        np.testing.assert_array_equal(out, img)
        assert out is not img
    flat = img[..., 0]
    out = random_erasing(flat, np.random.default_rng(0), p=1.0)
    assert out.shape == flat.shape and (out == 0).any()


# ---- compositions --------------------------------------------------------------------------------


def column_image(h: int = 48, w: int = 64) -> np.ndarray:
    """Every column constant: a crop, resize or flip keeps it so (within cv2's 1-level rounding); a
    rotation or an erased box does not."""
    cols = np.broadcast_to(10 + 3 * np.arange(w), (h, w))
    return np.stack([cols, np.full((h, w), 100), np.full((h, w), 250)], axis=-1).astype(np.uint8)


def columns_constant(img: np.ndarray) -> bool:
    return int((img.max(axis=0).astype(int) - img.min(axis=0)).max()) <= 1


@pytest.mark.parametrize("fn", ["train", "tta"])
def test_compositions_keep_type_and_are_seeded(fn):
    aug = (lambda x, r: augment_train(x, r)) if fn == "train" else augment_tta
    img = noise()
    a = aug(img, rng_for(0, "uid", 1))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, aug(img, rng_for(0, "uid", 1)))
    assert not np.array_equal(a, aug(img, rng_for(0, "uid", 2)))


def test_compositions_forced_probabilities():
    img = noise()
    np.testing.assert_array_equal(augment_tta(img, rng_for(1), 0, 0, (1, 1)), img)
    np.testing.assert_array_equal(augment_tta(img, rng_for(1), 1, 1, (1, 1)), hflip(reverse_channels(img)))
    np.testing.assert_array_equal(augment_train(img, rng_for(1), NO_RANDOM), img)
    both = AugmentConfig(p_reverse=1, p_hflip=1, p_shift_scale_rotate=0, p_erase=0, crop_ratio=(1, 1))
    np.testing.assert_array_equal(augment_train(img, rng_for(1), both), hflip(reverse_channels(img)))
    flat = img[..., 0]
    no_rev = AugmentConfig(p_reverse=0)
    assert augment_train(flat, rng_for(2), no_rev).shape == flat.shape
    assert augment_tta(flat, rng_for(2), p_reverse=0).shape == flat.shape
    with pytest.raises(ValueError):
        augment_tta(flat, rng_for(2))  # p_reverse > 0 on a 2D image fails on every call


def test_tta_never_warps_or_erases_but_train_does():
    img = column_image()
    assert all(columns_constant(augment_tta(img, rng_for(3, s))) for s in range(60))
    warp = AugmentConfig(p_shift_scale_rotate=1.0, p_erase=0.0, crop_ratio=(1, 1))
    erase = AugmentConfig(p_shift_scale_rotate=0.0, p_erase=1.0, crop_ratio=(1, 1))  # box never cropped off
    assert not any(columns_constant(augment_train(img, rng_for(3, s), warp)) for s in range(20))
    assert not any(columns_constant(augment_train(img, rng_for(3, s), erase)) for s in range(20))


def test_reversal_and_flip_rates():
    img = column_image()
    n = 400
    tol = 4 * math.sqrt(0.25 / n)
    for fn in ("train", "tta"):
        reversed_, flipped = 0, 0
        for s in range(n):
            rng = rng_for(4, fn, s)
            out = augment_train(img, rng) if fn == "train" else augment_tta(img, rng)
            rev = out[..., 0].max() > 200  # channel 0 holds at most 199 unless reversed
            reversed_ += rev
            if fn == "tta":
                ramp = out[0, :, 2 if rev else 0].astype(int)
                flipped += ramp[0] > ramp[-1]
        assert abs(reversed_ / n - 0.5) < tol, (fn, reversed_)
        if fn == "tta":
            assert abs(flipped / n - 0.5) < tol, flipped


def test_augment_config_validation():
    with pytest.raises(ValueError):
        AugmentConfig(p_hflip=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(crop_ratio=(0.9, 0.6))
    with pytest.raises(ValueError):
        AugmentConfig(scale_limit=1.0)
    with pytest.raises(AttributeError):
        AugmentConfig().p_hflip = 0.0  # type: ignore[misc]


# ---- rng_for -------------------------------------------------------------------------------------


def test_rng_for_streams():
    first = rng_for(7, "1.2.840.1", 3).integers(0, 2**62, 8)
    np.testing.assert_array_equal(first, rng_for(7, "1.2.840.1", 3).integers(0, 2**62, 8))
    others = [rng_for(8, "1.2.840.1", 3), rng_for(7, "1.2.840.2", 3), rng_for(7, "1.2.840.1", 4),
              rng_for(7, "1.2.840.1", "3"), rng_for(7, 3, "1.2.840.1"), rng_for(7, "1.2.840.1")]  # fmt: skip
    for rng in others:
        assert not np.array_equal(first, rng.integers(0, 2**62, 8))
    for bad in (1.5, True, None):
        with pytest.raises(ValueError):
            rng_for(7, bad)  # type: ignore[arg-type]


def test_rng_for_independent_of_hash_seed():
    code = "from hemorrhage.augment import rng_for; print(rng_for(7, 'series', 3).integers(0, 2**62))"
    expected = str(rng_for(7, "series", 3).integers(0, 2**62))
    for hash_seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        got = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        assert got.stdout.strip() == expected

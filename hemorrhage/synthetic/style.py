"""How a synthetic head CT series is stored, as it varies between scanners and sites (`SeriesStyle`).

- how pixels are stored (`PIXEL_FORMATS`): signed 16 bit with intercept -1024 and a circular field of
  view padded with -2000 (GE-like), HU stored directly (intercept 0), unsigned 12 or 16 bit with
  intercept -1024, and the RSNA "BitsStored 12" quirk: unsigned 12 bit, intercept 0, raw = HU mod 4096,
  which only reads correctly after the community fix (raw + 1000, values >= 4096 wrap by 4096,
  intercept -1000);
- transfer syntax: explicit or implicit VR little endian, JPEG 2000 lossless, RLE lossless;
- single or multi-valued WindowCenter/WindowWidth;
- InstanceNumber running up, down, or unrelated to the position of the slice.

`draw_series_style` draws one; `encode_pixels` turns HU into the stored values and `expected_hu` /
`quirk_fix` read them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

HU_MIN, HU_MAX = -1024, 3071  # what 12 stored bits with intercept -1024 can hold
QUIRK_MIN, QUIRK_MAX = -1000, 3095  # HU range the BitsStored-12 quirk (and its fix) round-trips


@dataclass(frozen=True)
class PixelFormat:
    name: str
    pixel_representation: int  # 0 unsigned, 1 signed
    bits_stored: int
    intercept: float
    padding: int | None = None  # raw value outside a circular field of view

    @property
    def quirk(self) -> bool:
        return self.name == "quirk12"


PIXEL_FORMATS: dict[str, PixelFormat] = {
    "s16": PixelFormat("s16", 1, 16, -1024.0, -2000),
    "s16_hu": PixelFormat("s16_hu", 1, 16, 0.0, -2000),
    "u12": PixelFormat("u12", 0, 12, -1024.0),
    "u16": PixelFormat("u16", 0, 16, -1024.0),
    "quirk12": PixelFormat("quirk12", 0, 12, 0.0),
}

# (manufacturer, model, kernels, usual pixel format)
SCANNERS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("GE MEDICAL SYSTEMS", "LightSpeed VCT", ("STANDARD", "SOFT"), "s16"),
    ("GE MEDICAL SYSTEMS", "Revolution EVO", ("STANDARD",), "s16"),
    ("SIEMENS", "SOMATOM Definition AS", ("H31s", "J40s"), "u12"),
    ("TOSHIBA", "Aquilion ONE", ("FC26", "FC21"), "u16"),
    ("Philips", "iCT 256", ("UB", "UC"), "u12"),
    ("Hitachi Medical Corporation", "Supria", ("11",), "s16_hu"),
)
SINGLE_WINDOWS = ((40.0, 80.0), (40.0, 80.0), (35.0, 90.0), (30.0, 80.0), (40.0, 120.0))
MULTI_WINDOWS = (((40.0, 80.0), (80.0, 200.0)), ((40.0, 40.0, 40.0), (100.0, 100.0, 200.0)),
                 ((36.0, 600.0), (80.0, 2800.0)))


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is stored; drawn per series by `draw_series_style`."""

    pixel_format: str
    transfer_syntax: str
    window_centre: tuple[float, ...]
    window_width: tuple[float, ...]
    circular_fov: bool
    instance_order: str  # "bottom_up" | "top_down" | "scrambled"
    manufacturer: str
    model: str
    kernel: str

    @property
    def fmt(self) -> PixelFormat:
        return PIXEL_FORMATS[self.pixel_format]

    @property
    def quirk(self) -> bool:
        return self.fmt.quirk

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax in (JPEG2000Lossless, RLELossless)


# ----------------------------------------------------------------------------------------- drawing


def draw_series_style(rng: np.random.Generator, scanner: int, *, j2k_share: float, rle_share: float,
                      multi_window_share: float, quirk_share: float) -> SeriesStyle:
    """Storage of one series from scanner `scanner` (an index into SCANNERS, drawn once per study)."""
    manufacturer, model, kernels, fmt = SCANNERS[scanner]
    if rng.random() < quirk_share:
        fmt = "quirk12"
    elif rng.random() < 0.2:
        fmt = ("s16", "s16_hu", "u12", "u16")[rng.integers(4)]
    r = rng.random()
    if r < j2k_share:
        ts = JPEG2000Lossless
    elif r < j2k_share + rle_share:
        ts = RLELossless
    else:
        ts = ImplicitVRLittleEndian if rng.random() < 0.15 else ExplicitVRLittleEndian
    if rng.random() < multi_window_share:
        wc, ww = MULTI_WINDOWS[rng.integers(len(MULTI_WINDOWS))]
    else:
        c, w = SINGLE_WINDOWS[rng.integers(len(SINGLE_WINDOWS))]
        wc, ww = (c,), (w,)
    order = ("bottom_up", "top_down", "scrambled")[rng.choice(3, p=[0.45, 0.4, 0.15])]
    circular = PIXEL_FORMATS[fmt].padding is not None and rng.random() < 0.7
    return SeriesStyle(fmt, ts, tuple(wc), tuple(ww), bool(circular), order, manufacturer, model,
                       kernels[rng.integers(len(kernels))])


def instance_numbers(order: str, n: int, rng: np.random.Generator) -> tuple[int, ...]:
    """InstanceNumber of each slice in true position order."""
    if order == "bottom_up":
        nums = np.arange(1, n + 1)
    elif order == "top_down":
        nums = np.arange(n, 0, -1)
    else:  # e.g. numbered in acquisition or export order: unrelated to the position
        nums = rng.permutation(n) + 1
    return tuple(int(x) for x in nums)


# ----------------------------------------------------------------------------------------- pixels


def outside_circle(rows: int, columns: int) -> np.ndarray:
    """Pixels outside the reconstruction circle inscribed in the image."""
    r = (np.arange(rows) - (rows - 1) / 2.0)[:, None]
    c = (np.arange(columns) - (columns - 1) / 2.0)[None, :]
    return r**2 + c**2 > (min(rows, columns) / 2.0) ** 2


def encode_pixels(hu: np.ndarray, style: SeriesStyle) -> np.ndarray:
    """Stored pixel values for integer HU (any shape ending in rows x columns)."""
    fmt = style.fmt
    hu = np.asarray(hu, np.int32)
    if fmt.quirk:
        raw = np.mod(np.clip(hu, QUIRK_MIN, QUIRK_MAX), 4096)
    else:
        raw = np.clip(hu, HU_MIN, HU_MAX) - int(fmt.intercept)
        if style.circular_fov and fmt.padding is not None:
            raw = np.where(outside_circle(*hu.shape[-2:]), fmt.padding, raw)
    return raw.astype(np.int16 if fmt.pixel_representation else np.uint16)


def expected_hu(hu: np.ndarray, style: SeriesStyle) -> np.ndarray:
    """HU that a correct reader gets from the files (with the quirk fix applied where needed)."""
    raw = encode_pixels(hu, style).astype(np.int32)
    if style.quirk:
        return quirk_fix(raw) - 1000
    return raw + int(style.fmt.intercept)


def quirk_fix(raw: np.ndarray) -> np.ndarray:
    """The community fix for BitsStored-12 slices: raw + 1000, wrapping at 4096 (then intercept -1000)."""
    x = np.asarray(raw, np.int32) + 1000
    return np.where(x >= 4096, x - 4096, x)

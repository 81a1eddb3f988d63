"""hemorrhage.dicom and hemorrhage.windows on the real head CT slices, against pydicom's own LUT functions.

The oracles: pydicom's `apply_modality_lut` (HU), `apply_windowing` with LINEAR_EXACT (the window ramp),
and the original RSNA recipe written out in plain numpy (clip bounds, min-max, uint8 truncation).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import JPEG2000Lossless, RLELossless

from hemorrhage.dicom import (
    DicomReadError,
    fix_bits_stored_12,
    hu_values,
    needs_quirk_fix,
    read_header,
    read_hu,
    read_pixels,
    to_hu,
)
from hemorrhage.windows import (
    BRAIN,
    THREE_WINDOWS,
    Window,
    clip_to_window,
    header_window,
    minmax_uint8,
    parse_window_spec,
    render,
    render_stored,
    three_window_uint8,
    window_uint8,
)

HEAD_KEYS = ("head_j2k_pixelrep", "head_693_j2ki", "head_693_uncr", "head_693_unci", "head_693_j2kr")


def original_recipe(pixels: np.ndarray, wc, ww, slope, intercept) -> np.ndarray:
    """The original prepare_custom_data.py, written out: int() values, float64, clip, min-max, truncation."""
    def first(v) -> int:  # get_first_of_dicom_field_as_int
        return int(v[0]) if isinstance(v, pydicom.multival.MultiValue) else int(v)

    wc, ww, slope, intercept = first(wc), first(ww), first(slope), first(intercept)
    img = pixels.astype(float) * slope + intercept
    img = np.clip(img, wc - ww // 2, wc + ww // 2)
    mi, ma = img.min(), img.max()
    img = (img - mi) / (ma - mi) if ma - mi > 0 else img - mi
    return (img * 255).astype(np.uint8)


def write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------- reading


def test_header_of_the_real_j2k_slice(samples):
    h = read_header(samples.head_j2k_pixelrep)
    ds = pydicom.dcmread(samples.head_j2k_pixelrep, stop_before_pixels=True)
    assert (h.study_uid, h.series_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert h.sop_uid == ds.SOPInstanceUID
    assert h.modality == "CT" and "AXIAL" in h.image_type and not h.is_localizer
    assert (h.rows, h.columns, h.n_frames, h.bits_stored, h.pixel_representation) == (512, 512, 1, 13, 1)
    assert h.window_center == (40.0, 40.0, 40.0) and h.window_width == (100.0, 100.0, 200.0)  # all kept
    assert h.instance_number == 7 and h.transfer_syntax == JPEG2000Lossless and h.pixel_problem == ""
    o = np.array(ds.ImageOrientationPatient, float)
    np.testing.assert_allclose(h.normal, np.cross(o[:3], o[3:]) / np.linalg.norm(np.cross(o[:3], o[3:])))
    assert h.position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert not hasattr(pydicom, "read_file")  # the original's reader is gone in pydicom 3


@pytest.mark.parametrize("key", HEAD_KEYS)
def test_hu_equals_pydicom_modality_lut(samples, key):
    ds = pydicom.dcmread(samples[key])
    s = read_hu(samples[key])
    assert s.hu.dtype == np.float32 and s.hu.shape == (512, 512) and not s.quirk_fixed
    np.testing.assert_array_equal(s.hu, apply_modality_lut(ds.pixel_array, ds))


def test_pixel_representation_mismatch_reads_signed(samples):
    # the J2K stream says unsigned, the header signed: HU must show air and brain, not 65k-wrapped values
    hu = read_hu(samples.head_j2k_pixelrep).hu
    assert hu.min() <= -1000 and hu.max() < 4000
    assert 0 < np.median(hu[200:300, 200:300]) < 60  # brain parenchyma


def test_lossless_encodings_decode_identically(samples):
    uncr = read_pixels(samples.head_693_uncr)[1]
    np.testing.assert_array_equal(read_pixels(samples.head_693_j2kr)[1], uncr)  # JPEG 2000 lossless
    # the lossy J2K file decodes to exactly the pixels stored uncompressed beside it (693_UNCI)
    unci = read_pixels(samples.head_693_unci)[1]
    np.testing.assert_array_equal(read_pixels(samples.head_693_j2ki)[1], unci)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_copies_of_a_head_slice_decode_to_the_same_hu(samples, tmp_path, syntax):
    ds = pydicom.dcmread(samples.head_693_uncr)
    ds.compress(syntax, ds.pixel_array, generate_instance_uid=False)
    s = read_hu(write(ds, tmp_path / "x.dcm"))
    assert s.header.transfer_syntax == syntax
    np.testing.assert_array_equal(s.hu, read_hu(samples.head_693_uncr).hu)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_other_codecs_through_the_plugins(name):
    # pydicom's own small test images: one slice in RLE, JPEG 2000 and JPEG-LS; JPEG extended 12 bit too
    ref = read_pixels(get_testdata_file("MR_small.dcm"))[1]
    np.testing.assert_array_equal(read_pixels(get_testdata_file(name))[1], ref)
    h, raw = read_pixels(get_testdata_file("JPGExtended.dcm"))
    assert raw.shape == (h.rows, h.columns) and raw.max() > 0


def test_truncated_file(samples, tmp_path):
    data = Path(samples.head_693_uncr).read_bytes()
    p = tmp_path / "cut.dcm"
    p.write_bytes(data[: len(data) // 2])
    assert read_header(p).pixel_problem.startswith("truncated")  # seen without reading the pixels
    with pytest.raises(DicomReadError, match=r"cut\.dcm: .*(pixel data|truncated)"):
        read_hu(p)
    j2k = Path(samples.head_j2k_pixelrep).read_bytes()  # cut inside encapsulated pixel data
    q = tmp_path / "cut_j2k.dcm"
    q.write_bytes(j2k[: len(j2k) * 2 // 3])
    with pytest.warns(UserWarning), pytest.raises(DicomReadError, match=r"cut_j2k\.dcm: truncated"):
        read_hu(q)


def test_unreadable_files_name_the_file(tmp_path):
    junk = tmp_path / "notes.dcm"
    junk.write_text("not a dicom file\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    cases = ((junk, "not a DICOM file"), (empty, "empty file"), (tmp_path / "absent.dcm", "cannot open"))
    for p, why in cases:
        for fn in (read_header, read_hu):
            with pytest.raises(DicomReadError) as e:
                fn(p)
            assert str(e.value).startswith(str(p)) and why in str(e.value)
    err = pickle.loads(pickle.dumps(DicomReadError(junk, "x")))  # crosses process boundaries intact
    assert (err.path, err.reason) == (str(junk), "x")
    with pytest.raises(DicomReadError, match="cannot decode pixel data .*JPEG Extended"):
        read_pixels(get_testdata_file("JPEG-lossy.dcm"))  # a known-bad JPEG stream
    with pytest.raises(DicomReadError, match="not an image"):
        read_pixels(get_testdata_file("reportsi.dcm"))


def test_no_pixel_data_and_no_preamble(samples, tmp_path):
    ds = pydicom.dcmread(samples.head_693_uncr)
    del ds.PixelData
    p = write(ds, tmp_path / "nopix.dcm")
    assert read_header(p).pixel_problem == "no pixel data"
    with pytest.raises(DicomReadError, match="nopix.dcm: no pixel data"):
        read_hu(p)
    raw = pydicom.dcmread(samples.head_693_uncr)  # a bare dataset: no preamble, no 'DICM', no file meta
    raw.file_meta, raw.preamble = FileMetaDataset(), None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, raw, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = tmp_path / "IM0001"
    bare.write_bytes(buf.getvalue())
    assert bare.read_bytes()[128:132] != b"DICM"
    assert read_header(bare).pixel_problem == ""
    np.testing.assert_array_equal(read_hu(bare).hu, read_hu(samples.head_693_uncr).hu)


def test_rsna_style_uids_read_without_warnings(samples, tmp_path, caplog):
    ds = pydicom.dcmread(samples.head_693_uncr)
    with pydicom.config.disable_value_validation():  # 'ID_...' is not a valid UI value
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "ID_0a1b2c3d4"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "ID_study", "ID_series"
        p = write(ds, tmp_path / "ID_0a1b2c3d4.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom 3 warns (and logs) for every invalid UID it reads
        assert read_header(p).sop_uid == "ID_0a1b2c3d4"
        assert read_hu(p).header.series_uid == "ID_series"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ----------------------------------------------------------------------------------------- HU rules


def test_quirk_fix_recovers_hu_and_matches_the_kaggle_reference():
    hu = np.arange(-1000, 3096, dtype=np.int32).reshape(64, 64)
    raw = np.mod(hu, 4096).astype(np.uint16)  # what the quirk slices hold: HU mod 4096, intercept 0
    x = raw + 1000  # the Kaggle kernel's fix, verbatim in spirit (uint16 stays in range here)
    x[x >= 4096] = x[x >= 4096] - 4096
    np.testing.assert_array_equal(fix_bits_stored_12(raw), x)
    h = _header(bits_stored=12, pixel_representation=0, intercept=0.0)
    assert needs_quirk_fix(h)
    out, fixed = to_hu(raw, h)
    assert fixed and out.dtype == np.float32
    np.testing.assert_array_equal(out, hu)
    wrong, fixed = to_hu(raw, h, fix_quirk=False)  # switchable; then the slice reads as HU mod 4096
    assert not fixed and wrong.max() == 4095
    for kw in (dict(intercept=-1024.0), dict(bits_stored=16), dict(pixel_representation=1)):
        quirk = dict(bits_stored=12, pixel_representation=0, intercept=0.0)
        assert not needs_quirk_fix(_header(**{**quirk, **kw}))


def test_hu_is_float32_and_never_uint16_arithmetic():
    raw = np.array([[0, 1024, 4095]], np.uint16)
    hu, fixed = to_hu(raw, _header(intercept=-1024.0))
    np.testing.assert_array_equal(hu, [[-1024, 0, 3071]])
    assert hu.dtype == np.float32 and not fixed
    hu, _ = to_hu(raw, _header(slope=1.5, intercept=-1024.7))
    np.testing.assert_allclose(hu, raw * 1.5 - 1024.7, rtol=1e-6)
    hu, _ = to_hu(raw, _header(slope=1.5, intercept=-1024.7), original_int=True)  # the original's int()
    np.testing.assert_array_equal(hu, raw.astype(np.float64) * 1 - 1024)


def _header(**kw):
    from hemorrhage.dicom import DicomHeader

    base = dict(path="x", study_uid="1", series_uid="2", sop_uid="3", modality="CT", image_type=("AXIAL",),
                orientation=(1, 0, 0, 0, 1, 0), position=(0, 0, 0), instance_number=1, rows=1, columns=3,
                n_frames=1, bits_allocated=16, bits_stored=12, pixel_representation=0,
                photometric="MONOCHROME2", slope=1.0, intercept=-1024.0, window_center=(40.0,),
                window_width=(80.0,), transfer_syntax="")
    base.update(kw)
    return DicomHeader(**base)


# ----------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("key", HEAD_KEYS)
def test_window_equals_the_original_recipe(samples, key):
    ds = pydicom.dcmread(samples[key])
    s = read_hu(samples[key])
    ours = window_uint8(s.hu, header_window(s.header.window_center, s.header.window_width, original_int=True))
    ref = original_recipe(ds.pixel_array, ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope,
                          ds.RescaleIntercept)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("key", HEAD_KEYS)
def test_window_against_pydicom_voi(samples, key):
    """pydicom's LINEAR_EXACT ramp is the original recipe when the slice reaches both window ends."""
    ds = pydicom.dcmread(samples[key])
    s = read_hu(samples[key])
    w = header_window(s.header.window_center, s.header.window_width)
    assert w.width % 2 == 0 and s.hu.min() <= w.lo and s.hu.max() >= w.hi
    ours = window_uint8(s.hu, w).astype(np.int32)
    bits, signed = ds.BitsStored, ds.PixelRepresentation
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    y_min = (-(2 ** (bits - 1)) if signed else 0) * slope + intercept  # pydicom's output range
    y_max = ((2 ** (bits - 1) - 1) if signed else 2**bits - 1) * slope + intercept
    ds.VOILUTFunction = "LINEAR_EXACT"
    exact = (apply_windowing(s.hu.astype(np.float64), ds) - y_min) / (y_max - y_min) * 255
    diff = np.abs(ours - np.floor(exact + 1e-9))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # only float rounding at integer steps
    del ds.VOILUTFunction  # DICOM's default LINEAR: centre - 0.5 and width - 1, a sub-HU shift of the ramp
    linear = (apply_windowing(s.hu.astype(np.float64), ds) - y_min) / (y_max - y_min) * 255
    assert np.abs(ours - linear).max() <= 255 / (w.width - 1) + 1


def test_clip_bounds_and_minmax_against_numpy():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1200, 2000, size=(3, 40, 50)).astype(np.float32)
    w = Window(35.0, 75.0)  # odd width: bounds use floor division, as the original
    clipped = clip_to_window(hu, w)
    assert clipped.min() == 35 - 37 and clipped.max() == 35 + 37
    np.testing.assert_array_equal(clipped, np.clip(hu, -2, 72))
    out = minmax_uint8(hu)
    for k in range(3):  # per image, not over the stack
        ref = ((hu[k].astype(float) - hu[k].min()) / (hu[k].max() - hu[k].min()) * 255).astype(np.uint8)
        np.testing.assert_array_equal(out[k], ref)
    with np.errstate(all="raise"):
        const = minmax_uint8(np.full((2, 8, 8), 40.0))
    assert const.dtype == np.uint8 and not const.any()
    np.testing.assert_array_equal(window_uint8(np.full((8, 8), -1000.0), BRAIN), 0)  # all below: constant


def test_lookup_table_path_equals_the_float_formula():
    """window_uint8's integer fast path against the plain float64 composition it replaces."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        lo_hu = int(rng.integers(-3000, 500))
        hu = rng.integers(lo_hu, lo_hu + int(rng.integers(1, 4000)), size=(2, 37, 41)).astype(np.float32)
        centre = float(rng.integers(-200, 800)) + (0.5 if trial % 5 == 0 else 0.0)  # .5: fractional bounds
        w = Window(centre, float(rng.integers(1, 3000)))
        # integers, then fractional HU (the float path); -0.7: float32 differences are whole numbers
        # that float64 does not see as such (the table path once indexed past its end there)
        for img in (hu, hu + 0.25, hu * 1.5, hu - np.float32(0.7)):
            np.testing.assert_array_equal(window_uint8(img, w), minmax_uint8(clip_to_window(img, w)))
    img = (np.arange(50, 255, dtype=np.float32) * np.float32(-1) + np.float32(3.3)).reshape(5, 41)
    np.testing.assert_array_equal(window_uint8(img, THREE_WINDOWS[2]), minmax_uint8(img))


def test_three_windows_and_specs(samples):
    hu = read_hu(samples.head_693_uncr).hu
    img = three_window_uint8(hu)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    for k, w in enumerate(THREE_WINDOWS):
        np.testing.assert_array_equal(img[..., k], window_uint8(hu, w))
    assert [(w.center, w.width) for w in THREE_WINDOWS] == [(40, 80), (80, 200), (600, 2800)]
    stack = three_window_uint8(np.stack([hu, hu[::-1]]))
    assert stack.shape == (2, 512, 512, 3)
    np.testing.assert_array_equal(stack[1], three_window_uint8(hu[::-1]))
    assert header_window((40.7, 80.0), (80.9, 200.0)) == Window(40.7, 80.9)  # first value
    assert header_window((40.7,), (80.9,), original_int=True) == Window(40.0, 80.0)
    assert header_window((), ()) == BRAIN and header_window((40,), (0,)) == BRAIN
    assert parse_window_spec("three").channels == 3 and parse_window_spec("bone").window == THREE_WINDOWS[2]
    assert parse_window_spec("50/100").window == Window(50, 100)
    assert parse_window_spec("HEADER").mode == "header"
    for bad in ("lung", "40", "40/0", "a/b"):
        with pytest.raises(ValueError):
            parse_window_spec(bad)
    header_rendered = render(hu, parse_window_spec("header"), (40,), (80,))
    np.testing.assert_array_equal(header_rendered, window_uint8(hu, BRAIN))


# ----------------------------------------------------------------------------------------- stored-value table


SPECS = ("header", "three", "brain", "bone", "35.5/75", "-1000/1")


def test_stored_value_table_equals_hu_per_pixel():
    """render_stored (a table over the stored range) against render on per-pixel HU: same bytes for
    signed, unsigned and 32-bit values, fractional and negative slopes, constant and narrow images."""
    rng = np.random.default_rng(2)
    cases = []
    for trial in range(30):
        dtype = (np.int16, np.uint16, np.int32, np.uint8)[trial % 4]
        info = np.iinfo(dtype)
        lo = int(rng.integers(max(info.min, -3000), min(info.max, 3000) - 1))
        hi = min(info.max, lo + int(rng.integers(1, 5000)))
        raw = rng.integers(lo, hi + 1, size=(23, 29)).astype(dtype)
        slope = (1.0, 0.5, 1.25, -1.0, 2.0, 0.0)[trial % 6]
        intercept = (-1024.0, 0.0, -1024.7, 3.3, 1000.0)[trial % 5]
        cases.append((raw, slope, intercept))
    cases.append((np.full((8, 8), 7, np.int16), 1.0, -1024.0))  # constant
    cases.append((np.array([[-32768, 32767]], np.int16), 1.0, 0.0))  # the whole signed range
    for raw, slope, intercept in cases:
        for name in SPECS:
            spec = parse_window_spec(name)
            ours = render_stored(raw, lambda v, s=slope, i=intercept: hu_values(v, s, i), spec, (40.0,),
                                 (80.0,))
            ref = render(hu_values(raw, slope, intercept), spec, (40.0,), (80.0,))
            assert ours is not None and ours.dtype == np.uint8
            np.testing.assert_array_equal(ours, ref, err_msg=f"{raw.dtype} {slope} {intercept} {name}")


def test_stored_value_table_declines_what_it_cannot_do():
    f = lambda v: hu_values(v, 1.0, 0.0)  # noqa: E731
    spec = parse_window_spec("header")
    assert render_stored(np.zeros((2, 4, 4), np.int16), f, spec) is None  # a stack: min-max per image
    assert render_stored(np.zeros((4, 4), np.float32), f, spec) is None  # not integers
    assert render_stored(np.zeros((0, 4), np.int16), f, spec) is None
    assert render_stored(np.array([[0, 1 << 20]], np.int32), f, spec) is None  # range beyond MAX_TABLE


@pytest.mark.parametrize("key", HEAD_KEYS)
def test_slice_image_equals_hu_then_window_on_the_real_slices(samples, key):
    """The table path of slice_image against read_hu + render (pydicom-checked above) on the real slices."""
    from hemorrhage.inputs import slice_image

    s = read_hu(samples[key])
    for name in ("header", "three", "subdural"):
        for original_int in (False, True):
            spec = parse_window_spec(name, original_int=original_int)
            h, img, fixed = slice_image(samples[key], spec)
            ref = render(read_hu(samples[key], original_int=original_int).hu, spec,
                         s.header.window_center, s.header.window_width)
            assert h == s.header and fixed == s.quirk_fixed
            np.testing.assert_array_equal(img, ref)


def test_slice_image_on_a_quirk_slice(samples, tmp_path):
    """BitsStored-12 quirk: the fixed int32 values go through the table and equal HU then window."""
    from hemorrhage.inputs import slice_image

    ds = pydicom.dcmread(samples.head_693_uncr)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.int64)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, 0
    ds.PixelData = np.mod(np.clip(hu, -1000, 3095), 4096).astype(np.uint16).tobytes()
    p = write(ds, tmp_path / "quirk.dcm")
    for name in ("header", "three"):
        spec = parse_window_spec(name)
        _, img, fixed = slice_image(p, spec)
        s = read_hu(p)
        assert fixed and s.quirk_fixed
        np.testing.assert_array_equal(img, render(s.hu, spec, s.header.window_center, s.header.window_width))
        np.testing.assert_array_equal(s.hu, np.clip(hu, -1000, 3095))


# ----------------------------------------------------------------------------------------- fast paths


PYDICOM_NATIVE_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm")


def header_fields(h) -> dict:
    return {k: v for k, v in vars(h).items() if k != "path"}


def reference_header(path: Path):
    """The header from a dataset whose elements pydicom has converted (the raw-bytes parser is skipped)."""
    from hemorrhage.dicom import header_from_dataset

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for _ in ds:  # iterating converts every element
        pass
    for _ in ds.file_meta:
        pass
    return header_from_dataset(ds, path)


def parity_files(samples, synthetic_head) -> list[Path]:
    real = [samples.head_j2k_pixelrep, samples.head_693_j2ki, samples.chest_ct_small, samples.head_693_uncr,
            samples.head_693_unci, samples.head_693_j2kr]
    synthetic = sorted(p for p in (synthetic_head / "dicom").rglob("*.dcm") if p.stat().st_size > 4096)
    return [Path(p) for p in real] + [Path(get_testdata_file(n)) for n in PYDICOM_NATIVE_FILES] + synthetic[::3]


def test_header_from_raw_bytes_equals_pydicoms_conversion(samples, synthetic_head):
    """Every header field parsed from the raw element bytes equals the one from pydicom's converted values,
    on the real slices, pydicom's native test files (implicit VR and big endian included) and the
    synthetic set (quirk, tilted, localizer, compressed series)."""
    files = parity_files(samples, synthetic_head)
    assert len(files) > 20
    syntaxes = set()
    for p in files:
        h = read_header(p)
        syntaxes.add(h.transfer_syntax)
        assert header_fields(h) == header_fields(reference_header(p)), p
        assert header_fields(read_pixels(p)[0]) == header_fields(h), p
    assert {str(pydicom.uid.ImplicitVRLittleEndian), str(pydicom.uid.ExplicitVRBigEndian),
            str(pydicom.uid.JPEG2000Lossless)} <= syntaxes


def test_raw_header_values_edge_cases(samples, tmp_path):
    """Multi-valued, padded, empty and non-numeric elements parse as pydicom's values do."""
    ds = pydicom.dcmread(samples.head_693_uncr)
    ds.WindowCenter, ds.WindowWidth = ["40", "300.5"], ["80", "2000"]
    ds.ImageType = ["DERIVED", "SECONDARY", "LOCALIZER"]
    ds.InstanceNumber, ds.RescaleSlope = None, "1.25"
    p = write(ds, tmp_path / "edge.dcm")
    h = read_header(p)
    assert h.window_center == (40.0, 300.5) and h.window_width == (80.0, 2000.0)
    assert h.image_type == ("DERIVED", "SECONDARY", "LOCALIZER") and h.is_localizer
    assert h.instance_number is None and h.slope == 1.25
    assert header_fields(h) == header_fields(reference_header(p))
    ds.RescaleIntercept = "-1024"
    data = write(ds, tmp_path / "ok.dcm").read_bytes()
    element = b"\x28\x00\x52\x10DS\x06\x00-1024 "  # (0028,1052) explicit VR little endian, even length
    assert data.count(element) == 1
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(data.replace(element, element[:8] + b"abc   "))  # pydicom refuses to write this itself
    with pytest.raises(DicomReadError, match="bad.dcm.*RescaleIntercept 'abc' is not a number"):
        read_header(bad)


def test_native_pixels_equal_pydicoms_pixel_array(samples, synthetic_head):
    """The in-place view of native slices has pydicom's values and dtype; other syntaxes go to pydicom."""
    from hemorrhage.dicom import header_from_dataset, native_pixels

    viewed = 0
    for p in parity_files(samples, synthetic_head):
        ds = pydicom.dcmread(p)
        ref = ds.pixel_array
        h, raw = read_pixels(p)
        assert raw.dtype == ref.dtype and raw.shape == ref.shape, p
        np.testing.assert_array_equal(raw, ref)
        view = native_pixels(ds, header_from_dataset(ds, p))
        if view is not None:
            viewed += 1
            assert not view.flags.writeable  # a view of the file's bytes: nobody may write into it
            np.testing.assert_array_equal(view, ref)
        elif h.transfer_syntax in (str(pydicom.uid.ExplicitVRLittleEndian), str(pydicom.uid.ImplicitVRLittleEndian)):
            raise AssertionError(f"{p}: a native little-endian slice was not viewed in place")
    assert viewed >= 10


@pytest.mark.parametrize("signed,extend,garbage", [(False, False, False), (False, False, True),
                                                   (True, True, False), (True, False, False)])
def test_native_pixels_unused_high_bits(samples, tmp_path, signed, extend, garbage):
    """BitsStored 12 in 16 bits: values inside the 12-bit range are viewed; garbage high bits and signed
    values without sign extension go to pydicom, which masks and extends them. Same values either way."""
    from hemorrhage.dicom import header_from_dataset, native_pixels

    ds = pydicom.dcmread(samples.head_693_uncr)
    rng = np.random.default_rng(0)
    lo, hi = (-2048, 2047) if signed else (0, 4095)
    values = rng.integers(lo, hi + 1, (ds.Rows, ds.Columns)).astype(np.int32)
    stored = values & 0x0FFF if signed and not extend else values
    if garbage:
        stored = stored | (rng.integers(0, 16, stored.shape) << 12)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
    ds.PixelData = stored.astype(np.int16 if signed and extend else np.uint16).tobytes()
    p = write(ds, tmp_path / "bits.dcm")
    ref = pydicom.dcmread(p).pixel_array
    np.testing.assert_array_equal(ref, values)  # pydicom's own handling is the reference
    h, raw = read_pixels(p)
    np.testing.assert_array_equal(raw, ref)
    assert raw.dtype == ref.dtype
    ds2 = pydicom.dcmread(p)
    viewed = native_pixels(ds2, header_from_dataset(ds2, p)) is not None
    assert viewed == (not garbage and (extend or not signed))


def test_native_pixels_short_pixel_data_is_an_error(samples, tmp_path):
    ds = pydicom.dcmread(samples.head_693_uncr)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    p = write(ds, tmp_path / "short.dcm")
    with pytest.raises(DicomReadError, match="short.dcm"):
        read_pixels(p)

"""NIfTI -> HDF5 preprocessing: parity with nibabel on the real chest CT, HU decisions, bad input."""

from __future__ import annotations

import csv
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ctclip.data.nifti import VolumeError, read_nifti, to_ras
from ctclip.data.preprocess import VolumeParams, display_view, hu_of_uint8, preprocess_volume
from ctclip.data.rescale import CsvRescale, RescaleError, decide_hu_mapping
from ctclip.data.store import VolumeStore
from scripts.ctclip_preprocess import main as preprocess_main
from tests.nifti_cases import real_chest, reoriented, write

SMALL = VolumeParams(target_shape=(24, 48, 48))
STEP = 2000.0 / 255.0  # HU per uint8 step for the default range


@pytest.fixture(scope="module")
def chest(samples):
    return real_chest(samples.chest_ct)


# ---------------------------------------------------------------- parity on the real volume
def test_raw_read_matches_nibabel(samples):
    vol = read_nifti(samples.chest_ct)
    img = nib.load(samples.chest_ct)
    np.testing.assert_array_equal(vol.raw, img.dataobj.get_unscaled())
    assert (vol.scl_slope, vol.scl_inter) == (1.0, -1024.0)
    np.testing.assert_allclose(vol.affine, img.affine)
    assert vol.axcodes == "LAS"


def test_orientation_equals_nibabel_closest_canonical(samples):
    vol = read_nifti(samples.chest_ct)
    ras, affine = to_ras(vol.raw, vol.affine)
    canon = nib.as_closest_canonical(nib.load(samples.chest_ct))
    np.testing.assert_allclose(affine, canon.affine)
    np.testing.assert_array_equal(ras * vol.scl_slope + vol.scl_inter, canon.get_fdata())


def test_hu_is_slope_times_raw_plus_intercept(samples):
    vol = read_nifti(samples.chest_ct)
    csv_row = CsvRescale(1.0, -1024.0)
    mapping = decide_hu_mapping(vol.raw, 1.0, 0.0, csv_row, "csv")  # the raw stored values + CSV
    hu = mapping.apply(vol.raw)
    np.testing.assert_array_equal(hu, vol.raw.astype(np.float32) * 1.0 - 1024.0)
    np.testing.assert_array_equal(hu, nib.load(samples.chest_ct).get_fdata().astype(np.float32))


def _reference_pipeline(path, params: VolumeParams):
    """Straightforward reference: nibabel float64 -> canonical -> clip -> resize, in the stored layout."""
    canon = nib.as_closest_canonical(nib.load(path))
    hu = np.clip(canon.get_fdata(), *params.hu_range)
    view = np.ascontiguousarray(display_view(hu, params.slide_b2u)).astype(np.float32)
    return view


def test_full_pipeline_matches_reference_within_one_step(samples):
    params = VolumeParams()  # real default target 160x224x224
    out, attrs = preprocess_volume(read_nifti(samples.chest_ct), None, params)
    assert out.dtype == np.uint8 and out.shape == (160, 224, 224)
    assert attrs["rescale"] == "nifti"  # the sample carries its own scaling, nothing else is applied
    ref = _reference_pipeline(samples.chest_ct, params)
    s, n = attrs["content_start"], attrs["content_shape"]
    ref = F.interpolate(torch.from_numpy(ref)[None, None], size=tuple(n), mode="trilinear",
                        align_corners=False)[0, 0].numpy()
    ours = hu_of_uint8(out[s[0]:s[0] + n[0], s[1]:s[1] + n[1], s[2]:s[2] + n[2]], params.hu_range)
    # uint8 -> HU round trip within half a step (+ float32 noise of the separable resize at .5 ties)
    assert np.abs(ours - ref).max() <= STEP / 2 + 0.1
    # padding is air
    assert out[: s[0]].max() == 0 and out[s[0] + n[0]:].max() == 0


def test_aspect_ratio_preserved_within_one_voxel(samples):
    vol = read_nifti(samples.chest_ct)
    _, attrs = preprocess_volume(vol, None, VolumeParams())
    d, h, w = attrs["content_shape"]
    src_d, src_h, src_w = 133, 512, 512  # RAS z, y, x of the sample
    scale = min(160 / src_d, 224 / src_h, 224 / src_w)
    for got, src in ((d, src_d), (h, src_h), (w, src_w)):
        assert abs(got - src * scale) <= 1


def test_spacing_option_preserves_physical_aspect(samples):
    vol = read_nifti(samples.chest_ct)
    _, attrs = preprocess_volume(vol, None, VolumeParams(spacing=(1.5, 1.5, 1.5)))
    d, h, w = attrs["content_shape"]
    extent_mm = np.array([133 * 2.5, 512 * 0.703125, 512 * 0.703125])
    ratio = np.array([d, h, w]) / extent_mm
    assert np.ptp(ratio) / ratio.mean() < 0.01
    out_sp = np.array(attrs["output_spacing"])
    assert np.allclose(out_sp, out_sp.mean(), rtol=0.01)  # isotropic output voxels


def test_slide_b2u_reverses_slices_and_nothing_else(chest):
    hu, affine = chest
    from ctclip.data.nifti import NiftiVolume

    vol = NiftiVolume(None, hu, affine, (5.625, 5.625, 10.0), 1.0, 0.0)  # type: ignore[arg-type]
    params = VolumeParams(target_shape=(34, 64, 64))  # content fills the grid: no padding to shift
    up, a_up = preprocess_volume(vol, None, params)
    down, a_down = preprocess_volume(vol, None, VolumeParams(target_shape=(34, 64, 64), slide_b2u=False))
    assert a_up["content_shape"] == [34, 64, 64]
    np.testing.assert_array_equal(up[::-1], down)
    assert not np.array_equal(up, down)
    # b2u: first slice is the most inferior (abdomen, little lung air), last is superior
    lung_air = lambda s: (s < 40).mean()  # noqa: E731
    assert up[0].mean() != up[-1].mean() and lung_air(up[5]) != lung_air(up[-5])


@pytest.mark.parametrize("codes", ["RAS", "LPS", "SAR", "PIL"])
def test_any_on_disk_orientation_gives_the_same_stored_volume(chest, tmp_path, codes):
    hu, affine = chest
    base = preprocess_volume(read_nifti(write(tmp_path / "las.nii.gz", hu, affine)), None, SMALL)[0]
    data, aff = reoriented(hu, affine, codes)
    other = preprocess_volume(read_nifti(write(tmp_path / f"{codes}.nii.gz", data, aff)), None, SMALL)[0]
    # the resize runs in on-disk axis order, so float32 rounding may break a .5 tie the other way
    diff = np.abs(base.astype(int) - other)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


# ---------------------------------------------------------------- HU decisions (no double scaling)
def test_auto_never_double_applies(chest, tmp_path):
    hu, affine = chest
    csv_1024, csv_8192 = CsvRescale(1, -1024), CsvRescale(1, -8192)
    already = read_nifti(write(tmp_path / "hu.nii.gz", hu, affine))
    raw_1024 = read_nifti(write(tmp_path / "r1.nii.gz", (hu + 1024).astype(np.int16), affine))
    raw_8192 = read_nifti(write(tmp_path / "r8.nii.gz", (hu.astype(np.int32) + 8192).astype(np.int16), affine))
    own = read_nifti(write(tmp_path / "own.nii.gz", (hu + 1024).astype(np.int16), affine, 1.0, -1024.0))
    cases = [(already, csv_1024, "none"), (already, csv_8192, "none"), (raw_1024, csv_1024, "csv"),
             (raw_8192, csv_8192, "csv"), (own, csv_1024, "nifti"), (raw_1024, None, "guess"),
             (raw_8192, None, "guess"), (raw_8192, CsvRescale(float("nan"), -8192), "guess")]
    ref = preprocess_volume(already, None, SMALL)[0]
    for vol, row, source in cases:
        out, attrs = preprocess_volume(vol, row, SMALL)
        assert attrs["rescale"] == source, (vol.path, attrs["rescale_reason"])
        np.testing.assert_array_equal(out, ref)


def test_csv_mode_needs_a_valid_row(chest):
    hu, _ = chest
    with pytest.raises(RescaleError, match="no metadata row"):
        decide_hu_mapping(hu, 1.0, 0.0, None, "csv")
    with pytest.raises(RescaleError, match="invalid RescaleSlope"):
        decide_hu_mapping(hu, 1.0, 0.0, CsvRescale(float("nan"), -1024), "csv")


# ---------------------------------------------------------------- the script: resume, bad input
def _meta(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing"])
        w.writerows(rows)
    return path


def _args(src, out, *extra):
    return ["--ct_data_path", str(src), "--ct_out_path", str(out), "--target_shape", "24", "48", "48",
            "--num_workers", "0", *extra]


def test_bad_inputs_fail_alone_and_are_listed(chest, tmp_path, caplog):
    hu, affine = chest
    src = tmp_path / "in"
    good = write(src / "p1" / "valid_1_a_1.nii.gz", hu, affine)
    write(src / "p1" / "valid_1_a_2.nii.gz", (hu + 1024).astype(np.int16), affine)  # raw, row below
    write(src / "valid_2_a_1.nii.gz", (hu + 1024).astype(np.int16), affine)  # raw, no row
    write(src / "valid_3_a_1.nii.gz", hu[:, :, :5], affine)  # fewer slices than the target: padded
    (src / "valid_4_a_1.nii.gz").write_bytes(good.read_bytes()[:5000])  # truncated
    write(src / "valid_5_a_1.nii.gz", np.stack([hu, hu], -1), affine)  # 4D
    write(src / "valid_6_a_1.nii.gz", hu[:, :, 0], affine)  # 2D
    write(src / "valid_7_a_1.nii.gz", hu, affine, zooms=(0.0, 5.6, 10.0))  # zero spacing
    write(src / "valid_8_a_1.nii.gz", hu, affine, zooms=(np.nan, 5.6, 10.0))  # NaN spacing
    write(src / "valid_9_a_1.nii.gz", (hu + 1024).astype(np.int16), affine)  # raw, NaN slope in CSV
    meta = _meta(tmp_path / "meta.csv", [["valid_1_a_1.nii.gz", 1, -1024, "[1, 1]"],
                                         ["valid_1_a_2.nii.gz", 1, -1024, "[1, 1]"],
                                         ["valid_9_a_1.nii.gz", "nan", -1024, "[1, 1]"]])
    out = tmp_path / "missing" / "folder" / "store.h5"  # output in a folder that does not exist yet
    with caplog.at_level(logging.INFO):
        rc = preprocess_main(_args(src, out, "--metadata_path", str(meta)))
    assert rc == 3
    with open(str(out) + ".errors.csv") as f:
        errors = {r["VolumeName"]: r["error"] for r in csv.DictReader(f)}
    assert set(errors) == {f"valid_{i}_a_1.nii.gz" for i in (4, 5, 6, 7, 8)}
    assert "truncated" in errors["valid_4_a_1.nii.gz"] and str(src) in errors["valid_4_a_1.nii.gz"]
    assert "expected a 3D volume" in errors["valid_5_a_1.nii.gz"]
    assert "expected a 3D volume" in errors["valid_6_a_1.nii.gz"]
    assert "spacing" in errors["valid_7_a_1.nii.gz"] and "spacing" in errors["valid_8_a_1.nii.gz"]
    store = VolumeStore(out)
    assert store.names() == ["valid_1_a_1.nii.gz", "valid_1_a_2.nii.gz", "valid_2_a_1.nii.gz",
                             "valid_3_a_1.nii.gz", "valid_9_a_1.nii.gz"]
    decisions = {n: store.attrs(n)["rescale"] for n in store.names()}
    assert decisions == {"valid_1_a_1.nii.gz": "none", "valid_1_a_2.nii.gz": "csv", "valid_2_a_1.nii.gz": "guess",
                         "valid_3_a_1.nii.gz": "none", "valid_9_a_1.nii.gz": "guess"}
    np.testing.assert_array_equal(store.read("valid_1_a_1.nii.gz"), store.read("valid_1_a_2.nii.gz"))
    np.testing.assert_array_equal(store.read("valid_1_a_1.nii.gz"), store.read("valid_2_a_1.nii.gz"))
    assert "valid_2_a_1.nii.gz: rescale guess" in caplog.text  # the fallback is logged per volume
    thin = store.read("valid_3_a_1.nii.gz")
    assert store.attrs("valid_3_a_1.nii.gz")["content_shape"][0] < 24 and thin[0].max() == 0
    store.close()

    # --rescale csv: the volumes without a usable row now fail, the rest is kept
    out_csv = tmp_path / "csv.h5"
    assert preprocess_main(_args(src, out_csv, "--metadata_path", str(meta), "--rescale", "csv")) == 3
    with open(str(out_csv) + ".errors.csv") as f:
        failed = {r["VolumeName"]: r["error"] for r in csv.DictReader(f)}
    assert "no metadata row" in failed["valid_2_a_1.nii.gz"]
    assert "invalid RescaleSlope" in failed["valid_9_a_1.nii.gz"]


def test_resume_skips_done_and_keeps_them(chest, tmp_path, capsys):
    hu, affine = chest
    src = tmp_path / "in"
    for i in range(3):
        write(src / f"train_{i}_a_1.nii.gz", np.roll(hu, i, axis=0), affine)
    out = tmp_path / "s.h5"
    assert preprocess_main(_args(src, out, "--limit", "2")) == 0
    with VolumeStore(out) as store:
        first = {n: store.read(n) for n in store.names()}
    assert len(first) == 2
    assert preprocess_main(_args(src, out)) == 0
    assert "1 done, 2 skipped" in capsys.readouterr().out
    with VolumeStore(out) as store:
        assert len(store) == 3
        for n, arr in first.items():
            np.testing.assert_array_equal(store.read(n), arr)
    # a different config on the same store is a usage error, --overwrite starts over
    assert preprocess_main(_args(src, out, "--hu_range", "-1200", "600")) == 2
    assert preprocess_main(_args(src, out, "--hu_range", "-1200", "600", "--overwrite")) == 0


def test_usage_errors(tmp_path, chest):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert preprocess_main(_args(empty, tmp_path / "x.h5")) == 2
    assert preprocess_main(_args(tmp_path / "nope", tmp_path / "x.h5")) == 2
    hu, affine = chest
    write(tmp_path / "in" / "a_1_a_1.nii.gz", hu, affine)
    bad_meta = tmp_path / "m.csv"
    bad_meta.write_text("VolumeName,Slope\nx,1\n")
    assert preprocess_main(_args(tmp_path / "in", tmp_path / "x.h5", "--metadata_path", str(bad_meta))) == 2
    assert preprocess_main(_args(tmp_path / "in", tmp_path / "x.h5", "--rescale", "csv")) == 2
    assert not (tmp_path / "x.h5").exists()


def test_volume_error_names_file(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_bytes(b"\x1f\x8b" + b"0" * 10)
    with pytest.raises(VolumeError, match=str(p)):
        read_nifti(p)
    q = tmp_path / "y.nii"
    q.write_bytes(b"not a nifti at all" * 30)
    with pytest.raises(VolumeError, match="not a readable NIfTI header"):
        read_nifti(q)


def test_synthetic_raw_and_hu_variants_store_the_same_array(tmp_path):
    """CT-RATE's pitfall end to end: the same synthetic volumes stored raw (CSV intercept needed) and
    already in HU (CSV intercept must NOT be applied) give identical stores under --rescale auto."""
    from scripts.ctclip_make_synthetic import main as make_synthetic

    stores = {}
    for variant in ("raw", "hu"):
        out = tmp_path / variant
        assert make_synthetic(["--out_dir", str(out), "--n_patients", "3", "--size", "48", "48", "--slices", "20",
                               "--seed", "6", "--variant", variant, "--intercept_8192_rate", "0.5"]) == 0
        meta = pd.concat([pd.read_csv(out / "train_metadata.csv"), pd.read_csv(out / "validation_metadata.csv")])
        meta.to_csv(out / "all_metadata.csv", index=False)
        assert set(meta.RescaleIntercept) == {-1024, -8192}  # both CT-RATE intercepts are exercised
        stores[variant] = out / "store.h5"
        assert preprocess_main(["--ct_data_path", str(out / "volumes"), "--ct_out_path", str(stores[variant]),
                                "--metadata_path", str(out / "all_metadata.csv"), "--target_shape", "20", "48", "48",
                                "--num_workers", "0"]) == 0
    with VolumeStore(stores["raw"]) as raw, VolumeStore(stores["hu"]) as hu:
        assert raw.names() == hu.names() and len(raw) >= 3
        for name in raw.names():
            np.testing.assert_array_equal(raw.read(name), hu.read(name))
            assert raw.attrs(name)["rescale"] == "csv" and hu.attrs(name)["rescale"] == "none"


def test_multi_member_gzip_is_read_whole(samples, tmp_path):
    """libdeflate stops after the first gzip member; bgzip-style files must still be read completely."""
    import gzip

    raw = gzip.decompress(samples.chest_ct.read_bytes())
    block = 65280  # bgzip block size: many members of equal length
    multi = tmp_path / "bgzip_like.nii.gz"
    multi.write_bytes(b"".join(gzip.compress(raw[i:i + block], compresslevel=1) for i in range(0, len(raw), block)))
    np.testing.assert_array_equal(read_nifti(multi).raw, read_nifti(samples.chest_ct).raw)

"""NIfTI -> HDF5 preprocessing: parity with nibabel on the real chest CT, HU decisions, bad input."""

from __future__ import annotations

import csv
import logging

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ctclip.data.nifti import NiftiVolume, VolumeError, read_nifti, to_ras
from ctclip.data.preprocess import VolumeParams, hu_of_uint8, preprocess_volume, stored_view
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


def _seed_recipe(path, target_shape=(160, 224, 224), slide_b2u=False):
    """The seed's run_preprocess.py restated (ratio-preserving path, its defaults: no --slide_b2u, which
    there flips H): the oracle the stores must equal byte for byte."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = img.get_fdata() * 1.0 + 0.0  # the seed hard-codes slope 1 / intercept 0 (the header's scaling only)
    vol = np.clip(data, -1000, 1000).transpose(2, 1, 0).astype(np.float32)
    scale = min(t / n for t, n in zip(target_shape, vol.shape))
    new = [int(round(n * scale)) for n in vol.shape]
    resized = F.interpolate(torch.tensor(vol)[None, None], size=new, mode="trilinear",
                            align_corners=False).squeeze().numpy()
    pads = [((t - n) // 2, t - n - (t - n) // 2) for t, n in zip(target_shape, new)]
    padded = np.pad(resized, pads, mode="constant", constant_values=-1000)
    u = np.clip((padded / 1000.0 + 1.0) / 2.0 * 255.0, 0, 255)
    return u.astype(np.uint8) if slide_b2u else u[:, ::-1, :].astype(np.uint8)


@pytest.fixture(scope="module")
def chest_copies(samples, tmp_path_factory):
    """The real chest CT at full resolution as stored (LAS, raw + header scaling) and flipped / axis-permuted."""
    img = nib.load(samples.chest_ct)
    raw = np.asarray(img.dataobj.get_unscaled())
    folder = tmp_path_factory.mktemp("chest_copies")
    paths = {"LAS": samples.chest_ct}
    for codes in ("RAS", "LPS", "SAR", "PIL"):
        data, aff = reoriented(raw, img.affine, codes)
        paths[codes] = write(folder / f"{codes}.nii", data, aff, 1.0, -1024.0)
    return paths


def test_store_equals_the_seeds_byte_for_byte(chest_copies):
    """Default settings = the seed's defaults: the same bytes, whatever the on-disk orientation."""
    seed = _seed_recipe(chest_copies["LAS"])
    np.testing.assert_array_equal(_seed_recipe(chest_copies["PIL"]), seed)  # the seed reorients first
    for codes, path in chest_copies.items():
        out, attrs = preprocess_volume(read_nifti(path), None, VolumeParams())
        assert attrs["rescale"] == "nifti"  # the header's scaling, as nibabel's get_fdata applies it
        assert out.tobytes() == seed.tobytes(), codes


def test_store_equals_the_seeds_at_a_small_target(chest_copies):
    """At 12x48x48 PyTorch's 2D bilinear kernel rounds differently from its trilinear one: the two-pass
    resize must use the trilinear kernel to stay bit-identical."""
    seed = _seed_recipe(chest_copies["LAS"], (24, 48, 48))
    for codes in ("LAS", "SAR"):
        out = preprocess_volume(read_nifti(chest_copies[codes]), None, VolumeParams(target_shape=(24, 48, 48)))[0]
        assert out.tobytes() == seed.tobytes(), codes


def test_fractional_header_scaling_takes_the_float64_path_and_stays_the_seeds(chest, tmp_path):
    """slope 0.37 / intercept -1024.3: slope * raw + intercept is not exact in float32, so the slabs are
    scaled in float64 (as nibabel's get_fdata) before the cast, and the bytes still equal the seed's."""
    hu, affine = chest
    raw = np.round((hu.astype(np.float64) + 1024.3) / 0.37).astype(np.int16)
    path = write(tmp_path / "scaled.nii", raw, affine, 0.37, -1024.3)
    out = preprocess_volume(read_nifti(path), None, SMALL)[0]
    assert out.tobytes() == _seed_recipe(path, SMALL.target_shape).tobytes()


def test_rounding_is_the_seeds_levels_or_one_above(chest):
    hu, affine = chest
    vol = NiftiVolume(None, hu, affine, (5.625, 5.625, 10.0), 1.0, 0.0)  # type: ignore[arg-type]
    trunc = preprocess_volume(vol, None, SMALL)[0].astype(int)
    rounded = preprocess_volume(vol, None, VolumeParams(target_shape=SMALL.target_shape, quantize="round"))[0]
    step = rounded - trunc
    assert step.min() == 0 and step.max() == 1 and 0.3 < step.mean() < 0.7  # about half the voxels go up


def test_full_pipeline_matches_reference_within_one_step(samples):
    params = VolumeParams()  # real default target 160x224x224
    out, attrs = preprocess_volume(read_nifti(samples.chest_ct), None, params)
    canon = nib.as_closest_canonical(nib.load(samples.chest_ct))  # float64 reference in the seed's layout
    ref = np.ascontiguousarray(stored_view(np.clip(canon.get_fdata(), *params.hu_range).transpose(2, 1, 0), "seed", True))
    s, n = attrs["content_start"], attrs["content_shape"]
    ref = F.interpolate(torch.from_numpy(ref)[None, None], size=tuple(n), mode="trilinear",
                        align_corners=False)[0, 0].numpy()
    ours = hu_of_uint8(out[s[0]:s[0] + n[0], s[1]:s[1] + n[1], s[2]:s[2] + n[2]], params.hu_range)
    # level u holds HU in [lo + u * STEP, lo + (u + 1) * STEP): truncation loses less than one step
    # (+ float32 noise of the resize, measured 0.011 HU, against this float64 reference)
    err = ref - ours
    assert err.min() >= -0.05 and err.max() < STEP + 0.05
    assert out[: s[0]].max() == 0 and out[s[0] + n[0]:].max() == 0  # padding is air


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


def test_layouts_are_flips_of_the_seeds_and_content_start_follows(chest):
    hu, affine = chest
    vol = NiftiVolume(None, hu, affine, (5.625, 5.625, 10.0), 1.0, 0.0)  # type: ignore[arg-type]
    target = (41, 81, 72)  # content 38 x 72 x 72: odd padding along D and H
    outs = {}
    for layout, b2u in (("seed", True), ("radiological", True), ("seed", False), ("radiological", False)):
        params = VolumeParams(target_shape=target, layout=layout, slide_b2u=b2u)
        out, attrs = preprocess_volume(vol, None, params)
        s, n = attrs["content_start"], attrs["content_shape"]
        assert n == [38, 72, 72]
        box = out[s[0]:s[0] + n[0], s[1]:s[1] + n[1], s[2]:s[2] + n[2]]
        outs[params.codes] = (out, box)
    assert sorted(outs) == ["IPL", "IPR", "SPL", "SPR"]
    seed, seed_box = outs["SPR"]
    for codes, flip in (("SPL", (slice(None), slice(None), slice(None, None, -1))),
                        ("IPR", (slice(None, None, -1),)), ("IPL", (slice(None, None, -1), slice(None), slice(None, None, -1)))):
        out, box = outs[codes]
        np.testing.assert_array_equal(out, seed[flip], err_msg=codes)
        np.testing.assert_array_equal(box, seed_box[flip], err_msg=codes)


def test_stored_axes_point_where_the_codes_say(samples):
    """Independent of our orientation code: organ centroids from the real label map (TotalSegmentator)
    put through the pipeline land where anatomy says. Liver: patient's right, below the heart; heart:
    anterior to the aorta's descending part."""
    mask_img = nib.load(samples.chest_mask)
    labels = np.asarray(mask_img.dataobj).astype(np.int16)
    read = read_nifti(samples.chest_ct)
    for layout, b2u in (("seed", True), ("radiological", False)):
        params = VolumeParams(target_shape=(48, 96, 96), layout=layout, slide_b2u=b2u, rescale="none")
        centres = {}
        for organ, label in (("liver", 5), ("heart", 51)):
            organ_hu = np.where(labels == label, 1000, -1000).astype(np.int16)
            out = preprocess_volume(NiftiVolume(None, organ_hu, mask_img.affine, read.zooms, 1.0, 0.0), None,  # type: ignore[arg-type]
                                    params)[0]
            centres[organ] = np.argwhere(out > 127).mean(axis=0) / np.array(out.shape)  # (D, H, W) in [0, 1)
        codes = params.codes
        liver, heart = centres["liver"], centres["heart"]
        assert (liver[0] < heart[0]) == (codes[0] == "S")  # D towards S: the liver comes first
        assert heart[1] < 0.5  # H runs anterior -> posterior: the heart sits in the front half
        assert (liver[2] > 0.5) == (codes[2] == "R")  # the liver is on the patient's right


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


def test_where_the_hu_decision_departs_from_the_references_on_purpose(chest, tmp_path):
    """The seed applies only the header's scaling (slope 1 / intercept 0 hard-coded, CSV ignored): a raw
    volume without header scaling comes out 1024 HU too bright. CT-CLIP applies the CSV row always: an
    already-HU volume comes out 1024 HU too dark. Ours stores, for both, what the seed stores for the HU
    volume (docs/differences.md)."""
    hu, affine = chest
    hu_path = write(tmp_path / "hu.nii", hu, affine)
    raw_path = write(tmp_path / "raw.nii", (hu + 1024).astype(np.int16), affine)
    row = CsvRescale(1.0, -1024.0)
    seed_hu = _seed_recipe(hu_path, SMALL.target_shape)
    for path in (raw_path, hu_path):
        assert preprocess_volume(read_nifti(path), row, SMALL)[0].tobytes() == seed_hu.tobytes(), path.name
    body = seed_hu > 0  # not air-clipped: the shift shows
    seed_raw = _seed_recipe(raw_path, SMALL.target_shape).astype(int)
    assert (seed_raw - seed_hu)[body].mean() > 100  # +1024 HU is about 130 levels where not clipped
    twice = write(tmp_path / "twice.nii", (hu - 1024).clip(-32768).astype(np.int16), affine)  # CT-CLIP's result
    assert (_seed_recipe(twice, SMALL.target_shape).astype(int) - seed_hu)[body].mean() < -60


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
    with h5py.File(out, "r") as f:  # plain h5py, as the seed's dataset reads: a failed volume has no name
        for name in errors:
            with pytest.raises(KeyError):
                f[name]
        assert sorted(n for n in f if n != "_pending") == store.names()

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

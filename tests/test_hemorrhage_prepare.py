"""scripts/hemorrhage_prepare.py end to end on the synthetic head CT set and the real head slices.

The PNGs are checked against an oracle computed here from the files with plain pydicom (the quirk fix
written out), the npz fast path against the PNGs, and the order against the generator's truth.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from hemorrhage.run.prepare_worker import png_name
from hemorrhage.windows import three_window_uint8
from scripts.hemorrhage_prepare import main

# a cut JPEG 2000 file: pydicom warns while reading it, and the run reports it as failed
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")


def oracle_image(path: Path) -> np.ndarray:
    """What the slice should look like: careful HU (quirk fix included), header window, original recipe."""
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.int64)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        raw = raw + 1000
        raw[raw >= 4096] -= 4096
        intercept = -1000.0
    hu = raw * slope + intercept
    wc = ds.WindowCenter[0] if isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else ds.WindowCenter
    ww = ds.WindowWidth[0] if isinstance(ds.WindowWidth, pydicom.multival.MultiValue) else ds.WindowWidth
    img = np.clip(hu, float(wc) - float(ww) // 2, float(wc) + float(ww) // 2)
    img = (img - img.min()) / (img.max() - img.min()) if img.max() > img.min() else img - img.min()
    return (img * 255).astype(np.uint8)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def png_run(synthetic_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "png_run"
    rc = main(["--input_dir", str(synthetic_head / "dicom"), "--output_dir", str(out), "--num_workers", "0"])
    return rc, out


def intact(t: dict) -> list[int]:
    return [k for k in range(len(t["sop_uids"])) if t["broken"][k] == ""]


def test_png_run_writes_every_slice_as_the_oracle_says(synthetic_head, synthetic_head_truths, png_run):
    rc, out = png_run
    assert rc == 3  # the set holds two broken files
    expected = {str(t["sop_uids"][k]): synthetic_head / str(t["paths"][k]) for t in synthetic_head_truths for k in intact(t)}
    pngs = sorted(p.name for p in (out / "png").iterdir())
    assert pngs == sorted(png_name(s) for s in expected)  # no localizer, no broken file, no temp file
    for sop, path in expected.items():
        img = cv2.imread(str(out / "png" / png_name(sop)), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (128, 128)
        np.testing.assert_array_equal(img, oracle_image(path))


def test_errors_manifest_and_quirk_count(synthetic_head, synthetic_head_truths, png_run, capsys):
    rc, out = png_run
    broken = {r["path"]: r["kind"] for r in read_csv(synthetic_head / "broken.csv")}
    errors = read_csv(out / "errors.csv")
    assert {f"dicom/{r['path']}" for r in errors} == set(broken)
    assert all(r["error"] == "no pixel data" or r["error"].startswith("truncated") for r in errors)
    rows = read_csv(out / "manifest.csv")
    n_quirk = sum(len(intact(t)) for t in synthetic_head_truths if t["quirk"])
    assert sum(int(r["quirk_fixed"]) for r in rows) == n_quirk > 0
    for t in synthetic_head_truths:  # order in the manifest = the generator's true order
        mine = sorted((int(r["order"]), r["SOPInstanceUID"], r["status"]) for r in rows
                      if r["SeriesInstanceUID"] == str(t["series_uid"]) and r["included"] == "1")
        written = [sop for _, sop, status in mine if status == "written"]
        assert written == [str(t["sop_uids"][k]) for k in intact(t)]
    assert {r["status"] for r in rows} == {"written", "failed", "left_out"}
    assert all("localizer" in r["flags"] for r in rows if r["status"] == "left_out")
    # a resumed run skips everything done, retries the failures and reports the same count of failures
    before = {p.name: p.stat().st_mtime_ns for p in (out / "png").iterdir()}
    victim = sorted(before)[0]
    (out / "png" / victim).unlink()
    (out / "png" / f".{victim}.tmp").write_bytes(b"half a png")  # what a killed run leaves behind
    (out / "png" / f".{victim}.partial-999").write_bytes(b"half a png")  # ... with ctcore.atomic's names
    assert main(["-i", str(synthetic_head / "dicom"), "-o", str(out), "-j", "0"]) == 3
    line = capsys.readouterr().out.splitlines()[0]
    assert f"1 written, {len(before) - 1} already done, 2 failed" in line
    assert not list((out / "png").glob(".*.tmp")) and not list((out / "png").glob(".*.partial-*"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "png").iterdir() if p.name != victim} == \
        {k: v for k, v in before.items() if k != victim}
    other_settings = ["-i", str(synthetic_head / "dicom"), "-o", str(out), "-j", "0", "--window", "three"]
    assert main(other_settings) == 2


def test_npz_in_a_process_pool_equals_the_pngs(synthetic_head, synthetic_head_truths, png_run, tmp_path, capsys):
    _, png_out = png_run
    out = tmp_path / "npz_run"
    assert main(["-i", str(synthetic_head / "dicom"), "-o", str(out), "--format", "npz", "--n_jobs", "2"]) == 3
    n_quirk = sum(len(intact(t)) for t in synthetic_head_truths if t["quirk"])
    assert f"{n_quirk} BitsStored-12 fixes" in capsys.readouterr().out
    for t in synthetic_head_truths:
        with np.load(out / "npz" / f"{t['series_uid']}.npz") as z:
            sops = z["sop_uids"].tolist()
            # the cut JPEG 2000 slice passes the header pass and fails at decode: left out of the stack
            assert sops == [str(t["sop_uids"][k]) for k in intact(t)]
            assert z["images"].dtype == np.uint8 and z["images"].shape == (len(sops), 128, 128)
            assert np.all(np.diff(z["positions"]) > 0) and str(z["series_uid"]) == str(t["series_uid"])
            for img, sop in zip(z["images"], sops, strict=True):
                np.testing.assert_array_equal(img, cv2.imread(str(png_out / "png" / png_name(sop)),
                                                              cv2.IMREAD_UNCHANGED))
    assert main(["-i", str(synthetic_head / "dicom"), "-o", str(out), "--format", "npz", "-j", "0"]) == 3
    # complete stacks are skipped; the series with the broken file is retried
    assert "already done" in capsys.readouterr().out


def test_quirk_fix_can_be_switched_off(synthetic_head, synthetic_head_truths, tmp_path, capsys):
    t = next(t for t in synthetic_head_truths if t["quirk"] and (t["broken"] == "").all())
    src = tmp_path / "in"
    src.mkdir()
    for k, p in enumerate(t["paths"]):
        shutil.copy(synthetic_head / str(p), src / f"{k:03d}")
    assert main(["-i", str(src), "-o", str(tmp_path / "fixed"), "-j", "0", "--format", "npz"]) == 0
    assert f"{len(t['paths'])} BitsStored-12 fixes" in capsys.readouterr().out
    assert main(["-i", str(src), "-o", str(tmp_path / "raw"), "-j", "0", "--format", "npz",
                 "--no-fix_bits_stored_12"]) == 0
    assert "0 BitsStored-12 fixes" in capsys.readouterr().out
    name = f"npz/{t['series_uid']}.npz"
    with np.load(tmp_path / "fixed" / name) as a, np.load(tmp_path / "raw" / name) as b:
        assert a["quirk_fixed"].all() and not b["quirk_fixed"].any()
        assert not np.array_equal(a["images"], b["images"])


def test_three_windows_on_the_real_slices(samples, tmp_path):
    src = tmp_path / "in" / "patient"
    src.mkdir(parents=True)
    for key in ("head_j2k_pixelrep", "head_693_uncr"):
        shutil.copy(samples[key], src / Path(samples[key]).name)
    out = tmp_path / "out"
    assert main(["-i", str(tmp_path / "in"), "-o", str(out), "--window", "three", "-j", "0",
                 "--config", "configs/hemorrhage/prepare.yaml"]) == 0
    for key in ("head_j2k_pixelrep", "head_693_uncr"):
        ds = pydicom.dcmread(samples[key])
        hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
        img = cv2.imread(str(out / "png" / png_name(ds.SOPInstanceUID)), cv2.IMREAD_UNCHANGED)
        assert img.shape == (512, 512, 3)  # cv2 hands the channels back in the order written
        np.testing.assert_array_equal(img, three_window_uint8(hu))
    rows = read_csv(out / "manifest.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"written"}
    npz = tmp_path / "npz"
    assert main(["-i", str(tmp_path / "in"), "-o", str(npz), "--window", "three", "-j", "0",
                 "--format", "npz", "--compress"]) == 0
    for r in rows:  # channels first in the stacks: (N, 3, H, W)
        with np.load(npz / "npz" / f"{r['SeriesInstanceUID']}.npz") as z:
            png = cv2.imread(str(out / r["output"]), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(z["images"], np.moveaxis(png, -1, 0)[None])


def test_bad_input_exits_2(samples, tmp_path, caplog):
    assert main(["-i", str(tmp_path / "absent"), "-o", str(tmp_path / "o1")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "o2"), "-j", "0"]) == 2
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_text("not a dicom file")
    assert main(["-i", str(junk), "-o", str(tmp_path / "o3"), "-j", "0"]) == 2
    assert read_csv(tmp_path / "o3" / "errors.csv")[0]["path"] == "a.dcm"
    assert main(["-i", str(junk), "-o", str(tmp_path / "o4"), "--window", "lung"]) == 2
    mr = tmp_path / "mr"
    mr.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), mr / "IM1")
    assert main(["-i", str(mr), "-o", str(tmp_path / "o5"), "-j", "0"]) == 2  # no CT slices
    assert "no CT slices among 1 files (0 unreadable, left out: non_ct 1)" in caplog.text
    assert png_name("ID_abc") == "ID_abc.png" and png_name("1.2.3") == "ID_1.2.3.png"


def test_original_int_truncates_like_the_original(samples, tmp_path):
    ds = pydicom.dcmread(samples.head_693_uncr)
    ds.WindowCenter, ds.WindowWidth, ds.RescaleIntercept = "40.7", "99.6", "-1024.5"
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "IM1", enforce_file_format=True)
    raw = ds.pixel_array.astype(np.float64)
    for flag, (c, w, intercept) in (([], (40.7, 99.6, -1024.5)), (["--original_int"], (40, 99, -1024))):
        out = tmp_path / f"out{len(flag)}"
        assert main(["-i", str(tmp_path / "in"), "-o", str(out), "-j", "0", *flag]) == 0
        img = np.clip(raw + intercept, c - w // 2, c + w // 2)
        want = ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
        got = cv2.imread(str(out / "png" / png_name(ds.SOPInstanceUID)), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(got, want)
        assert read_csv(out / "manifest.csv")[0]["window"] == f"{c:g}/{w:g}"

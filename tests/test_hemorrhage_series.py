"""hemorrhage.series on the synthetic head CT set: every series found, true slice order, flags, CSVs.

The set is generated once per session (configs/hemorrhage/synthetic_small.yaml with seed 0: JPEG 2000,
RLE, implicit VR, two BitsStored-12 series, a tilted series, thin series, localizers inside an axial
series and in their own series, one truncated and one pixel-less file); the first test asserts that.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from hemorrhage.series import (
    DUPLICATE_POSITION,
    DUPLICATE_SOP,
    LOCALIZER,
    MULTIFRAME,
    NO_POSITION,
    NON_CT,
    NOT_IMAGE,
    QUIRK,
    discover,
    find_dicom_files,
    write_errors,
    write_manifest,
)


@pytest.fixture(scope="module")
def files(synthetic_head) -> list[dict]:
    with open(synthetic_head / "truth" / "files.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def found(synthetic_head):
    return discover(synthetic_head / "dicom", num_workers=0, progress=False)


def by_series(found) -> dict[str, object]:
    return {s.series_uid: s for s in found.series}


def test_the_set_has_the_variety(synthetic_head_truths, files):
    syntaxes = {str(t["transfer_syntax"]) for t in synthetic_head_truths}
    assert {JPEG2000Lossless, RLELossless, ImplicitVRLittleEndian} <= syntaxes
    assert sum(bool(t["quirk"]) for t in synthetic_head_truths) >= 2 and any(t["kind"] == "thin" for t in synthetic_head_truths)
    assert any(abs(float(t["orientation"][5])) > 0.1 for t in synthetic_head_truths)  # gantry tilt
    axial_series = {str(t["series_uid"]) for t in synthetic_head_truths}
    locs = [r for r in files if r["kind"] == "localizer"]
    assert any(r["SeriesInstanceUID"] in axial_series for r in locs)  # a scout inside an axial series
    assert any(r["SeriesInstanceUID"] not in axial_series for r in locs)  # and one in its own series
    assert {r["broken"] for r in files} == {"", "truncated", "no_pixel_data"}


def test_every_study_and_series_is_found(synthetic_head, found, synthetic_head_truths):
    with open(synthetic_head / "studies.csv") as f:
        rows = list(csv.DictReader(f))
    with_slices = {(s.study_uid, s.series_uid) for s in found.series if s.slices}
    assert with_slices == {(r["StudyInstanceUID"], r["SeriesInstanceUID"]) for r in rows}
    assert found.n_studies == len({r["StudyInstanceUID"] for r in rows})
    assert found.n_files == sum(1 for p in (synthetic_head / "dicom").rglob("*") if p.is_file())


def test_slice_order_is_the_true_order(found, synthetic_head_truths):
    series = by_series(found)
    header_errors = {Path(e.path).resolve() for e in found.errors}
    for t in synthetic_head_truths:
        s = series[str(t["series_uid"])]
        paths = [Path(s_path) for s_path in t["paths"]]
        # the truth lists every slice in position order; slices whose header already fails are not there
        keep = [k for k in range(len(paths)) if (found.root.parent / paths[k]).resolve() not in header_errors]
        assert [e.header.sop_uid for e in s.slices] == [str(t["sop_uids"][k]) for k in keep]
        assert [e.order for e in s.slices] == list(range(len(s.slices))) and s.ordered_by == "position"
        pos = np.array([e.position for e in s.slices])
        np.testing.assert_allclose(pos, np.asarray(t["position_along_normal"])[keep], atol=1e-3)
        assert np.all(np.diff(pos) > 0)


def test_localizers_quirk_slices_and_broken_files_are_flagged(synthetic_head, found, synthetic_head_truths, files):
    flagged = {e.header.sop_uid: e for s in found.series for e in s.entries}
    locs = [r for r in files if r["kind"] == "localizer"]
    for r in locs:
        e = flagged[r["SOPInstanceUID"]]
        assert LOCALIZER in e.flags and not e.included and e.order == -1
    n_quirk = sum(int((t["broken"] != "no_pixel_data").sum()) for t in synthetic_head_truths if t["quirk"])
    assert found.flag_counts[QUIRK] == n_quirk > 0 and found.flag_counts[LOCALIZER] == len(locs)
    errors = {Path(e.path).relative_to(synthetic_head).as_posix(): e.error for e in found.errors}
    broken = {r["path"]: r["broken"] for r in files if r["broken"]}
    # native syntaxes: the header pass sees missing/cut pixel data; a cut JPEG 2000 file fails at decode
    seen_early = {p for p, kind in broken.items() if kind == "no_pixel_data" or not _is_j2k(synthetic_head / p)}
    assert set(errors) == seen_early
    assert all(v in ("no pixel data",) or v.startswith("truncated") for v in errors.values())


def _is_j2k(path: Path) -> bool:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_manifest_and_errors_csv(synthetic_head, found, tmp_path):
    m = write_manifest(found, tmp_path / "manifest.csv")
    e = write_errors(found.errors, tmp_path / "errors.csv", found.root)
    rows = list(csv.DictReader(open(m)))
    assert len(rows) == found.n_files - len(found.errors)
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "path", "position", "order",
            "flags"} <= set(rows[0])
    for r in rows:
        assert (found.root / r["path"]).is_file()
        assert (r["included"] == "1") == (int(r["order"]) >= 0)
    errs = list(csv.DictReader(open(e)))
    want = [Path(x.path).relative_to(found.root).as_posix() for x in found.errors]
    assert [r["path"] for r in errs] == want
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_process_pool_finds_the_same(synthetic_head, found):
    from hemorrhage.series import make_pool

    with make_pool(2) as pool:  # small trees are read in-process (POOL_MIN_FILES): pass a pool explicitly
        pooled = discover(synthetic_head / "dicom", progress=False, pool=pool)
    assert [(s.series_uid, [e.header.sop_uid for e in s.slices]) for s in pooled.series] == \
        [(s.series_uid, [e.header.sop_uid for e in s.slices]) for s in found.series]
    assert pooled.errors == found.errors


# ----------------------------------------------------------------------------------------- edge cases


def _series_files(synthetic_head: Path, synthetic_head_truths: list[dict], **want) -> tuple[dict, list[Path]]:
    for t in synthetic_head_truths:
        if all(str(t[k]) == str(v) for k, v in want.items()) and (t["broken"] == "").all():
            return t, [synthetic_head / str(p) for p in t["paths"]]
    raise AssertionError(f"no intact series with {want}")


def test_missing_position_falls_back_to_instance_number(synthetic_head, synthetic_head_truths, tmp_path, caplog):
    t, paths = _series_files(synthetic_head, synthetic_head_truths, transfer_syntax="1.2.840.10008.1.2.1", quirk=False)
    for k, p in enumerate(paths[:5]):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 5 - k  # numbered top down
        if k == 2:
            del ds.ImagePositionPatient
        ds.save_as(tmp_path / f"f{k}.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="hemorrhage.series"):
        d = discover(tmp_path, progress=False)
    (s,) = d.series
    assert s.ordered_by == "instance_number" and "InstanceNumber" in caplog.text
    assert [e.header.sop_uid for e in s.slices] == [str(u) for u in t["sop_uids"][:5][::-1]]
    assert [NO_POSITION in e.flags for e in s.slices] == [False, False, True, False, False]


def test_non_ct_duplicates_multiframe_and_one_slice_series(synthetic_head, synthetic_head_truths, samples, tmp_path):
    t, paths = _series_files(synthetic_head, synthetic_head_truths, transfer_syntax="1.2.840.10008.1.2.1", quirk=False)
    for k, p in enumerate(paths[:4]):
        shutil.copy(p, tmp_path / f"s{k}.dcm")
    shutil.copy(paths[0], tmp_path / "copy_of_s0.dcm")  # the same SOP twice
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "same_position.dcm", enforce_file_format=True)
    mr = pydicom.dcmread(paths[2])
    mr.Modality, mr.SOPInstanceUID = "MR", pydicom.uid.generate_uid()
    mr.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    mf = pydicom.dcmread(paths[3])
    mf.NumberOfFrames, mf.PixelData, mf.SOPInstanceUID = 2, mf.PixelData * 2, pydicom.uid.generate_uid()
    mf.save_as(tmp_path / "multiframe.dcm", enforce_file_format=True)
    sr = pydicom.dcmread(pydicom.data.get_testdata_file("reportsi.dcm"))
    sr.StudyInstanceUID, sr.SeriesInstanceUID = str(t["study_uid"]), str(t["series_uid"])
    sr.save_as(tmp_path / "report.dcm")
    (tmp_path / "one").mkdir()
    shutil.copy(samples.head_693_uncr, tmp_path / "one" / "IM1")  # a study of one slice elsewhere
    d = discover(tmp_path, progress=False)
    assert not d.errors
    s = next(s for s in d.series if s.series_uid == str(t["series_uid"]))
    flags = {Path(e.header.path).name: set(e.flags) for e in s.entries}
    assert DUPLICATE_SOP in flags["s0.dcm"] ^ flags["copy_of_s0.dcm"]  # one of the two is left out
    assert DUPLICATE_POSITION in flags["same_position.dcm"] and DUPLICATE_POSITION in flags["s1.dcm"]
    assert flags["mr.dcm"] >= {NON_CT} and flags["multiframe.dcm"] >= {MULTIFRAME}
    assert flags["report.dcm"] >= {NOT_IMAGE}
    assert len(s.slices) == 5  # s0..s3 and the same-position copy: duplicates of position are kept
    one = next(s for s in d.series if s.series_uid != str(t["series_uid"]))
    assert len(one.slices) == 1 and one.slices[0].order == 0 and one.ordered_by == "position"


def test_file_finding_and_bad_trees(samples, tmp_path):
    assert discover(tmp_path, progress=False).n_files == 0  # an empty folder is not an error here
    for name in ("a.png", "notes.txt", ".hidden.dcm", "DICOMDIR", "labels.csv"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "obj").write_text("x")
    (tmp_path / "junk.dcm").write_text("not dicom")
    shutil.copy(samples.head_693_uncr, tmp_path / "IM0001")
    data = Path(samples.head_693_uncr).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 3])
    paths, skipped = find_dicom_files(tmp_path)
    assert [p.name for p in paths] == ["IM0001", "cut.dcm", "junk.dcm"] and skipped == 5
    d = discover(tmp_path, progress=False)
    assert {Path(e.path).name: e.error.split(" ")[0] for e in d.errors} == {"cut.dcm": "truncated:",
                                                                           "junk.dcm": "not"}
    assert d.n_slices == 1


def test_a_sop_uid_copied_into_another_series_is_left_out(samples, tmp_path):
    import pydicom

    ds = pydicom.dcmread(samples.head_693_uncr)
    ds.save_as(tmp_path / "a.dcm")
    ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"  # same SOP, another series
    ds.save_as(tmp_path / "b.dcm")
    d = discover(tmp_path, progress=False)
    kept = [e for s in d.series for e in s.slices]
    assert len(kept) == 1 and d.flag_counts["duplicate_sop"] == 1

"""Synthetic head CT DICOM studies (hemorrhage.synthetic.head*): labels, DICOM correctness, variety, determinism.

One small dataset (128 x 128, 6 studies) is generated per module; seed 14 of this config happens to
contain every kind of variety the tests look for (asserted in `test_dataset_has_the_variety`).
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.uid import JPEG2000Lossless, RLELossless

from hemorrhage.classes import CLASSES, KAGGLE_ROW_ORDER, SUBTYPES
from hemorrhage.synthetic.config import HeadSynthConfig, validate_config
from hemorrhage.synthetic.head import generate_head_dataset, read_truth
from hemorrhage.synthetic.montage import read_slice_hu, save_head_montage
from hemorrhage.synthetic.study import synthesize_study
from hemorrhage.synthetic.style import expected_hu


def small_config(out_dir: Path, **kw) -> HeadSynthConfig:
    base = dict(out_dir=out_dir, n_studies=6, size=128, slices=14, seed=14, broken=2, thin_share=0.3,
                normal_share=0.2, j2k_share=0.25, rle_share=0.25, multi_window_share=0.4, quirk_share=0.25,
                localizer_share=0.5, tilt_share=0.2, **{f"p_{s}": 0.45 for s in SUBTYPES})
    base.update(kw)
    return HeadSynthConfig(**base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    cfg = small_config(tmp_path_factory.mktemp("synth") / "ds")
    summary = generate_head_dataset(cfg)
    return cfg, summary


@pytest.fixture(scope="module")
def truths(dataset) -> list[dict]:
    cfg, _ = dataset
    return [read_truth(p) for p in sorted((cfg.out_dir / "truth").glob("*.npz"))]


@pytest.fixture(scope="module")
def files(dataset) -> list[dict]:
    cfg, _ = dataset
    with open(cfg.out_dir / "truth" / "files.csv") as f:
        return list(csv.DictReader(f))


def oracle_hu(ds: pydicom.Dataset, fix_quirk: bool = True) -> np.ndarray:
    """HU as a careful reader computes them; the quirk fix written out here as the test's own oracle."""
    raw = ds.pixel_array.astype(np.int64)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if fix_quirk and ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100:
        raw = raw + 1000
        raw[raw >= 4096] -= 4096
        intercept = -1000.0
    return raw * slope + intercept


def read_series_hu(out_dir: Path, t: dict, fix_quirk: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume in true order, mask of readable slices) of one series, read from its files."""
    ok = t["broken"] == ""
    vol = np.zeros(t["masks"].shape, np.float64)
    for k in np.flatnonzero(ok):
        vol[k] = oracle_hu(pydicom.dcmread(out_dir / str(t["paths"][k])), fix_quirk)
    return vol, ok


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


# ----------------------------------------------------------------------------------------- content


def test_dataset_has_the_variety(dataset, truths, files):
    cfg, summary = dataset
    syntaxes, quirk, multi = set(), False, False
    for r in files:
        if r["broken"] or r["kind"] != "axial":
            continue
        ds = pydicom.dcmread(cfg.out_dir / r["path"], stop_before_pixels=True)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        quirk |= ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == 0
        multi |= isinstance(ds.WindowCenter, MultiValue)
    assert {JPEG2000Lossless, RLELossless} <= syntaxes
    assert quirk and multi
    n_findings = {int(t["study_index"]): len(t["findings"]) for t in truths}
    assert {0, 1} <= set(n_findings.values()) and max(n_findings.values()) >= 2  # none, one, several
    assert all(summary.positive_series[c] > 0 for c in CLASSES)
    assert summary.n_series > cfg.n_studies  # some studies have a thin series too
    assert summary.n_localizers > 0 and summary.n_broken == cfg.broken
    assert any(t["kind"] == "thin" for t in truths)


def test_every_file_reads_and_decodes(dataset, files):
    cfg, _ = dataset
    on_disk = {str(p.relative_to(cfg.out_dir)) for p in (cfg.out_dir / "dicom").rglob("*") if p.is_file()}
    assert on_disk == {r["path"] for r in files}  # no stray or temporary files
    for r in files:
        if r["broken"]:
            continue
        ds = pydicom.dcmread(cfg.out_dir / r["path"])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == r["SOPInstanceUID"]
        assert ds.StudyInstanceUID == r["StudyInstanceUID"] and ds.SeriesInstanceUID == r["SeriesInstanceUID"]
        assert ds.pixel_array.shape == (cfg.size, cfg.size)
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept", "WindowCenter", "WindowWidth", "InstanceNumber", "PatientID", "StudyDate"):
            assert tag in ds, (r["path"], tag)
        if r["kind"] == "axial":
            assert "AXIAL" in ds.ImageType and "SliceThickness" in ds
            assert float(ds.PixelSpacing[0]) * cfg.size == pytest.approx(float(ds.ReconstructionDiameter), abs=0.01)
            assert cfg.fov_min_mm <= float(ds.ReconstructionDiameter) <= cfg.fov_max_mm
        else:
            assert "LOCALIZER" in ds.ImageType
            assert [float(v) for v in ds.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]


def test_sorting_by_position_gives_true_order(dataset, truths):
    cfg, _ = dataset
    unsorted_names = instance_mismatch = 0
    for t in truths:
        ok = t["broken"] == ""
        true_order = [str(u) for u in t["sop_uids"][ok]]
        items = []
        for p in t["paths"][ok]:
            ds = pydicom.dcmread(cfg.out_dir / str(p), stop_before_pixels=True)
            iop = np.array(ds.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            items.append((float(np.dot(np.array(ds.ImagePositionPatient, float), normal)), str(p),
                          int(ds.InstanceNumber), ds.SOPInstanceUID, float(ds.SliceThickness)))
        by_position = [it[3] for it in sorted(items)]
        assert by_position == true_order
        gaps = np.diff(sorted(it[0] for it in items))
        assert np.all(gaps > 0) and np.min(gaps) == pytest.approx(float(t["thickness"]), abs=1e-3)
        unsorted_names += [it[3] for it in sorted(items, key=lambda it: it[1])] != true_order
        instance_mismatch += [it[3] for it in sorted(items, key=lambda it: it[2])] != true_order
    assert unsorted_names == len(truths)  # file names never give the order
    assert instance_mismatch > 0  # InstanceNumber does not always either


def test_labels_csv_matches_the_files(dataset, truths, files):
    cfg, summary = dataset
    lines = (cfg.out_dir / "labels.csv").read_text().splitlines()
    assert lines[0] == "ID,Label"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) % 6 == 0 and len(rows) // 6 == summary.n_slices
    labels: dict[str, dict[str, int]] = {}
    for i in range(0, len(rows), 6):
        block = [(rid.rsplit("_", 1), int(v)) for rid, v in rows[i:i + 6]]
        uids = {uid for (uid, _), _ in block}
        assert len(uids) == 1
        assert [c for (_, c), _ in block] == list(KAGGLE_ROW_ORDER)
        labels[uids.pop()] = {c: v for (_, c), v in block}
    broken = {line.split(",")[0] for line in (cfg.out_dir / "broken.csv").read_text().splitlines()[1:]}
    readable_axial = set()
    for r in files:
        if r["path"] in broken:
            continue
        ds = pydicom.dcmread(cfg.out_dir / r["path"], stop_before_pixels=True)
        if "LOCALIZER" not in ds.ImageType:
            readable_axial.add(ds.SOPInstanceUID)
    assert set(labels) == readable_axial
    for lab in labels.values():
        assert lab["any"] == max(lab[s] for s in SUBTYPES)
    for t in truths:  # and they agree with the truth masks
        for k, uid in enumerate(t["sop_uids"]):
            if t["broken"][k] == "":
                got = [labels[str(uid)][c] for c in CLASSES]
                assert got == t["labels"][k].tolist()
                planted = [int(((t["masks"][k] & b) > 0).any()) for b in t["subtype_bits"]]
                assert got[1:] == planted


def test_studies_csv(dataset, truths):
    cfg, summary = dataset
    with open(cfg.out_dir / "studies.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["StudyInstanceUID", "SeriesInstanceUID", "n_slices", *CLASSES]
        rows = {r["SeriesInstanceUID"]: r for r in reader}
    assert len(rows) == len(truths) == summary.n_series
    for t in truths:
        r = rows[str(t["series_uid"])]
        ok = t["broken"] == ""
        assert r["StudyInstanceUID"] == t["study_uid"] and int(r["n_slices"]) == ok.sum()
        assert [int(r[c]) for c in CLASSES] == t["labels"][ok].max(axis=0).tolist()


def test_planted_regions_have_blood_density(dataset, truths):
    cfg, _ = dataset
    checked = set()
    for t in truths:
        hu, ok = read_series_hu(cfg.out_dir, t)
        findings = {str(f) for f in t["findings"]}
        for bit, name in zip(t["subtype_bits"], t["subtypes"], strict=True):
            region = ((t["masks"] & bit) > 0) & ok[:, None, None]
            if name not in findings:
                assert not region.any(), f"{name} has a region but was not planted"
                continue
            if region.sum() == 0:
                continue
            mean = hu[region].mean()
            assert 50.0 <= mean <= 90.0, (name, mean)
            ring = (np.abs(hu[region] - mean) < 60).mean()  # the region is blood, not bone or air
            assert ring > 0.97, (name, ring)
            checked.add(str(name))
        brain = (hu > 15) & (hu < 45)
        assert brain.sum() > 0.05 * ok.sum() * cfg.size**2  # there is a brain around them
    assert checked == set(SUBTYPES)


def test_decoded_hu_equal_the_in_memory_study(dataset, truths):
    cfg, _ = dataset
    studies = {i: synthesize_study(cfg, i) for i in sorted({int(t["study_index"]) for t in truths})}
    seen = set()
    for t in truths:
        study = studies[int(t["study_index"])]
        s = next(x for x in study.series if x.meta.series_uid == t["series_uid"])
        assert np.array_equal(s.masks, t["masks"]) and np.array_equal(s.labels, t["labels"])
        hu, ok = read_series_hu(cfg.out_dir, t)
        assert np.array_equal(hu[ok], expected_hu(s.hu, s.meta.style)[ok])
        seen.add(str(t["transfer_syntax"]))
        if not s.meta.style.quirk:  # outside a padded circular field of view these are the true HU
            assert np.array_equal(hu[ok][:, 40:88, 40:88], s.hu[ok][:, 40:88, 40:88])
    assert {JPEG2000Lossless, RLELossless} <= seen


def test_quirk_slices_need_the_community_fix(dataset, truths):
    cfg, _ = dataset
    quirky = [t for t in truths if t["quirk"]]
    assert quirky
    for t in quirky:
        study = synthesize_study(cfg, int(t["study_index"]))
        true_hu = next(x for x in study.series if x.meta.series_uid == t["series_uid"]).hu
        k = int(np.flatnonzero(t["broken"] == "")[0])
        ds = pydicom.dcmread(cfg.out_dir / str(t["paths"][k]))
        assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (12, 11, 0) and float(ds.RescaleIntercept) == 0
        naive, fixed = oracle_hu(ds, fix_quirk=False), oracle_hu(ds, fix_quirk=True)
        air = true_hu[k] < -500
        assert air.any() and np.all(naive[air] > 3000)  # without the fix, air reads as dense bone
        assert np.array_equal(fixed, np.clip(true_hu[k], -1000, 3095))
        assert np.array_equal(read_slice_hu(cfg.out_dir / str(t["paths"][k])), fixed)


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_broken_files_are_broken(dataset, files):
    cfg, _ = dataset
    with open(cfg.out_dir / "broken.csv") as f:
        broken = list(csv.DictReader(f))
    assert len(broken) == cfg.broken and {b["kind"] for b in broken} == {"truncated", "no_pixel_data"}
    label_ids = (cfg.out_dir / "labels.csv").read_text()
    sop_of = {r["path"]: r["SOPInstanceUID"] for r in files}
    for b in broken:
        assert sop_of[b["path"]] not in label_ids
        path = cfg.out_dir / b["path"]
        if b["kind"] == "no_pixel_data":
            assert "PixelData" not in pydicom.dcmread(path)
        else:
            with pytest.raises(Exception):  # noqa: B017 - any failure to decode is what we want
                pydicom.dcmread(path).pixel_array  # noqa: B018


# ----------------------------------------------------------------------------------------- behaviour


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    cfg, _ = dataset
    again = small_config(tmp_path / "again")
    generate_head_dataset(again)
    assert tree_hashes(again.out_dir) == tree_hashes(cfg.out_dir)
    other = small_config(tmp_path / "other", seed=15, n_studies=2, broken=0)
    generate_head_dataset(other)
    first = small_config(tmp_path / "first", n_studies=2, broken=0)
    generate_head_dataset(first)
    assert sha256(other.out_dir / "labels.csv") != sha256(first.out_dir / "labels.csv")
    assert set(tree_hashes(other.out_dir).values()).isdisjoint(
        h for p, h in tree_hashes(first.out_dir).items() if p.startswith("dicom/"))


def test_in_memory_study_masks_and_geometry():
    cfg = HeadSynthConfig(size=64, slices=10, seed=3, normal_share=0.0, thin_share=1.0,
                          **{f"p_{s}": 1.0 for s in SUBTYPES})
    study = synthesize_study(cfg, 0)
    assert [s.kind for s in study.series] == ["thick", "thin"]
    thick, thin = study.series
    assert thin.meta.geometry.spacing == cfg.thin_mm and len(thin.hu) > len(thick.hu)
    for s in study.series:
        g = s.meta.geometry
        assert s.hu.shape == s.masks.shape == (len(g.positions), 64, 64) and s.hu.dtype == np.int16
        along = g.positions @ g.normal
        assert np.allclose(np.diff(along), g.spacing, atol=1e-3)
        assert g.pixel_spacing * 64 == pytest.approx(study.pose["fov_mm"], abs=0.01)
        for sub in SUBTYPES:
            per_slice = s.mask(sub).any(axis=(1, 2))
            assert np.array_equal(per_slice, s.labels[:, CLASSES.index(sub)].astype(bool))
    assert set(study.findings) == set(SUBTYPES)
    assert (thick.hu < -900).mean() > 0.2 and (thick.hu > 700).any()  # air around, skull present


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_rsna_uid_style(tmp_path):
    cfg = small_config(tmp_path / "rsna", n_studies=1, size=64, slices=6, broken=1, uid_style="rsna")
    generate_head_dataset(cfg)
    ids = [line.split(",")[0] for line in (cfg.out_dir / "labels.csv").read_text().splitlines()[1:]]
    assert ids and all(re.fullmatch(r"ID_[0-9a-f]{9}_[a-z]+", i) for i in ids)
    t = read_truth(next((cfg.out_dir / "truth").glob("*.npz")))
    assert re.fullmatch(r"ID_[0-9a-f]{10}", str(t["study_uid"]))
    ds = pydicom.dcmread(cfg.out_dir / str(t["paths"][0]))
    assert ds.SOPInstanceUID == t["sop_uids"][0] and ds.pixel_array.shape == (64, 64)


@pytest.mark.parametrize("change, message", [
    (dict(size=8), "size"), (dict(n_studies=0), "n_studies"), (dict(slices=1), "slices"),
    (dict(p_subdural=1.5), "p_subdural"), (dict(quirk_share=-0.1), "quirk_share"),
    (dict(uid_style="kaggle"), "uid_style"), (dict(broken=10**6), "broken"),
    (dict(fov_min_mm=300.0, fov_max_mm=200.0), "fov"), (dict(uid_style="rsna", slices=1000), "rsna"),
])
def test_bad_config_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        validate_config(small_config(tmp_path / "x", **change))


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = small_config(out, n_studies=1, size=32, slices=4, broken=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_head_dataset(cfg)
    cfg.overwrite = True
    generate_head_dataset(cfg)
    generate_head_dataset(cfg)  # replaces its own outputs, keeps the rest
    assert (out / "notes.txt").read_text() == "mine" and (out / "labels.csv").is_file()


def test_script_main_in_process(tmp_path, capsys):
    from scripts.hemorrhage_make_synthetic import main

    out, png = tmp_path / "cli", tmp_path / "montage.png"
    argv = ["--out_dir", str(out), "--n_studies", "3", "--size", "64", "--slices", "8", "--seed", "2",
            "--broken", "1", "--normal_share", "0", "--montage", str(png)]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("synthetic head CT: 3 studies") and "1 broken files" in line
    assert png.stat().st_size > 10_000 and (out / "labels.csv").is_file()
    assert main(argv) == 2  # out_dir is not empty now
    config = Path(__file__).resolve().parents[1] / "configs" / "hemorrhage" / "synthetic_small.yaml"
    assert main(["--config", str(config), "--out_dir", str(out), "--overwrite",
                 "--n_studies", "1", "--size", "32", "--broken", "0"]) == 0


def test_montage_of_the_dataset(dataset, tmp_path):
    cfg, _ = dataset
    png = save_head_montage(cfg.out_dir, tmp_path / "m.png", n_studies=3)
    assert png.is_file() and png.stat().st_size > 10_000


def test_dicom_style_uids_never_collide():
    """pydicom joins entropy sources without a separator: (1, 1, 11) and (11, 1, 1) once shared a SOP UID."""
    from hemorrhage.synthetic.header import make_uid

    keys = [(st, se, k) for st in range(30) for se in range(3) for k in range(30)]
    assert len({make_uid("dicom", 4, "sop", *key) for key in keys}) == len(keys)
    assert len({make_uid("dicom", 4, "series", st, se) for st in range(30) for se in range(12)}) == 360

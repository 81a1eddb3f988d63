"""Datasets over the store, report text handling, labels, and the patient-wise split."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from ctclip.data.dataset import CTLabelDataset, CTReportDataset
from ctclip.data.reports import TableError, clean_section, load_labels, report_text, text_columns
from ctclip.data.splits import closest_subset, patient_of
from ctclip.data.store_writer import StoreSpec, StoreWriter
from ctclip.findings import FINDINGS
from ctclip.run.split import FILES
from scripts.ctclip_split import main as split_main

SHAPE = (4, 16, 16)


def _vol(name: str) -> np.ndarray:
    return np.full(SHAPE, sum(map(ord, name)) % 251, dtype=np.uint8)


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "s.h5"
    names = [f"valid_{i}_a_1.nii.gz" for i in range(6)]
    with StoreWriter.open(path, names, StoreSpec(SHAPE, {}, "t")) as w:
        for n in names[:5]:  # the sixth stays incomplete
            w.commit(n, _vol(n), {})
    return path


def _reports(tmp_path, rows):
    df = pd.DataFrame(rows, columns=["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                     "Impressions_EN"])
    p = tmp_path / "reports.csv"
    df.to_csv(p, index=False)
    return p


def test_clean_section():
    assert clean_section(float("nan")) == "" and clean_section(None) == ""
    assert clean_section("Not given.") == "" and clean_section("  not given ") == ""
    assert clean_section(" Normal heart. ") == "Normal heart."


def test_report_dataset_text_and_counts(store, tmp_path, caplog):
    csv_path = _reports(tmp_path, [
        ["valid_0_a_1.nii.gz", "Cough.", "Non-contrast.", "Nodule in the right upper lobe.", "Lung nodule."],
        ["valid_1_a_1.nii.gz", np.nan, "Not given.", "No effusion.", np.nan],
        ["valid_2_a_1.nii.gz", "", "", "Emphysema.", "Not given."],
        ["valid_3_a_1.nii.gz", "", "", np.nan, np.nan],
        ["valid_5_a_1.nii.gz", "", "", "Incomplete volume.", "x"],  # volume not complete
        ["valid_9_a_1.nii.gz", "", "", "No volume at all.", "x"],
    ])
    ds = CTReportDataset(store, csv_path, "findings_impressions")
    assert ds.names == ["valid_0_a_1.nii.gz", "valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz", "valid_3_a_1.nii.gz"]
    assert ds.n_without_report == 1 and ds.n_without_volume == 2  # valid_4 has no report; 5 and 9 no volume
    assert "no report" in caplog.text
    vol, text = ds[0]
    assert vol.dtype == torch.uint8 and vol.shape == (1, *SHAPE)
    assert torch.equal(vol[0], torch.from_numpy(_vol("valid_0_a_1.nii.gz")))
    assert text == "Findings: Nodule in the right upper lobe. Impression: Lung nodule."
    assert ds[1][1] == "Findings: No effusion." and ds[3][1] == ""
    assert all("nan" not in t.lower() and "not given" not in t.lower() for t in ds.texts)
    assert CTReportDataset(store, csv_path, "impressions").texts == ["Lung nodule.", "", "", ""]
    assert CTReportDataset(store, csv_path, "findings")[2][1] == "Emphysema."
    full = CTReportDataset(store, csv_path, "reports")[0][1]
    assert full.startswith("Clinical information: Cough. Technique: Non-contrast. Findings:")
    with pytest.raises(ValueError, match="unknown text column"):
        text_columns("summary")


def test_reports_csv_missing_column_is_named(store, tmp_path):
    p = tmp_path / "r.csv"
    pd.DataFrame({"VolumeName": ["a"], "Findings": ["x"]}).to_csv(p, index=False)
    with pytest.raises(TableError, match="missing column.*'Findings_EN'"):
        CTReportDataset(store, p)


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_dataloader_workers_open_their_own_handle(store, tmp_path, ctx):
    csv_path = _reports(tmp_path, [[f"valid_{i}_a_1.nii.gz", "", "", f"text {i}", ""] for i in range(5)])
    ds = CTReportDataset(store, csv_path, "findings")
    ds[0]  # the parent opens the file before the workers start
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True, multiprocessing_context=ctx)
    for _ in range(2):  # two epochs through persistent workers
        seen = []
        for vols, texts in loader:
            for v, t in zip(vols, texts):
                name = f"valid_{t.split()[1]}_a_1.nii.gz"
                assert torch.equal(v[0], torch.from_numpy(_vol(name)))
                seen.append(name)
        assert sorted(seen) == ds.names


def _labels(tmp_path, rows, columns=("VolumeName", *FINDINGS)):
    p = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(p, index=False)
    return p


def test_label_dataset_order_and_missing(store, tmp_path, caplog):
    rows = [["valid_2_a_1.nii.gz", *([0] * 9 + [1] + [0] * 8)],
            ["valid_0_a_1.nii.gz", *([1] + [0] * 16 + [np.nan])],
            ["valid_7_a_1.nii.gz", *([0] * 18)]]
    ds = CTLabelDataset(store, _labels(tmp_path, rows))
    assert ds.names == ["valid_2_a_1.nii.gz", "valid_0_a_1.nii.gz"] and ds.missing_volumes == ["valid_7_a_1.nii.gz"]
    vol, y = ds[0]
    assert y.dtype == torch.float32 and y.shape == (18,) and y[FINDINGS.index("Lung nodule")] == 1 and y.sum() == 1
    assert math.isnan(float(ds[1][1][17])) and ds[1][1][0] == 1
    assert "not in" in caplog.text


def test_labels_csv_errors_name_the_problem(tmp_path):
    cols = ["VolumeName", *FINDINGS]
    cols[3] = "Cardiomegally"
    with pytest.raises(TableError, match="'Cardiomegaly'"):
        load_labels(_labels(tmp_path, [["a", *([0] * 18)]], cols))
    with pytest.raises(TableError, match="valid_1_a_1.nii.gz has '2' for 'Medical material'"):
        load_labels(_labels(tmp_path, [["valid_1_a_1.nii.gz", 2, *([0] * 17)]]))


def test_report_text_single_column_is_verbatim():
    assert report_text({"Findings_EN": "A."}, ("Findings_EN",)) == "A."


# ------------------------------------------------------------------------------------- split
def _ct_rate_valid(tmp_path, n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for pid in range(1, n_patients + 1):
        for scan in "ab"[: rng.integers(1, 3)]:
            names += [f"valid_{pid}_{scan}_{r}.nii.gz" for r in range(1, rng.integers(2, 4))]
    meta = pd.DataFrame({"VolumeName": names, "RescaleSlope": 1, "RescaleIntercept": -1024})
    reports = pd.DataFrame({"VolumeName": names, "ClinicalInformation_EN": "x", "Technique_EN": "y",
                            "Findings_EN": [f"f{i}" for i in range(len(names))], "Impressions_EN": np.nan})
    labels = pd.DataFrame({"VolumeName": names, **{f: rng.integers(0, 2, len(names)) for f in FINDINGS}})
    meta.to_csv(tmp_path / "validation_metadata.csv", index=False)
    reports.to_csv(tmp_path / "validation_reports.csv", index=False)
    labels.to_csv(tmp_path / "valid_predicted_labels.csv", index=False)
    return names


def test_split_by_patient(tmp_path):
    names = _ct_rate_valid(tmp_path)
    originals = {f: (tmp_path / f).read_bytes() for f, _, _ in FILES.values()}
    assert split_main(["--data_dir", str(tmp_path), "--target_val_size", "25", "--seed", "42"]) == 0
    summary = json.loads((tmp_path / "split_summary.json").read_text())
    val = pd.read_csv(tmp_path / "validation_metadata.csv")
    test = pd.read_csv(tmp_path / "test_metadata.csv")
    assert len(val) == 25 == summary["validation"]["volumes"]  # whole patients reach the target exactly here
    assert len(val) + len(test) == len(names)
    vp, tp = set(val.VolumeName.map(patient_of)), set(test.VolumeName.map(patient_of))
    assert not vp & tp and summary["validation"]["patients"] == len(vp) and summary["test"]["patients"] == len(tp)
    for current, backup, test_file in FILES.values():
        assert (tmp_path / backup).read_bytes() == originals[current]  # original kept
        a, b = pd.read_csv(tmp_path / current), pd.read_csv(tmp_path / test_file)
        assert set(a.VolumeName) == set(val.VolumeName) and set(b.VolumeName) == set(test.VolumeName)
    rep = pd.read_csv(tmp_path / "validation_reports.csv", keep_default_na=False)
    assert (rep.Impressions_EN == "").all()  # NaN stays empty, not "nan"
    # running again reads the backups and gives byte-identical outputs
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert split_main(["--data_dir", str(tmp_path), "--target_val_size", "25", "--seed", "42"]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # another seed picks other patients; the backups are never overwritten
    assert split_main(["--data_dir", str(tmp_path), "--target_val_size", "25", "--seed", "7"]) == 0
    assert set(pd.read_csv(tmp_path / "validation_metadata.csv").VolumeName.map(patient_of)) != vp
    assert (tmp_path / "original_validation_metadata.csv").read_bytes() == originals["validation_metadata.csv"]
    # new data replacing the split files while old backups remain: refused, nothing overwritten
    _ct_rate_valid(tmp_path, n_patients=30, seed=3)
    assert split_main(["--data_dir", str(tmp_path), "--target_val_size", "25"]) == 2
    assert (tmp_path / "original_validation_metadata.csv").read_bytes() == originals["validation_metadata.csv"]


def test_split_closest_possible_and_bad_rows(tmp_path):
    assert sum([4, 4, 4][i] for i in closest_subset([4, 4, 4], 5)) == 4
    assert sum([3, 3, 3][i] for i in closest_subset([3, 3, 3], 5)) == 6
    _ct_rate_valid(tmp_path)
    df = pd.read_csv(tmp_path / "validation_metadata.csv")
    df.loc[3, "VolumeName"] = "scan_without_pattern.nii.gz"
    df.to_csv(tmp_path / "validation_metadata.csv", index=False)
    assert split_main(["--data_dir", str(tmp_path)]) == 2
    assert split_main(["--data_dir", str(tmp_path / "nowhere")]) == 2


def test_sentence_sampling_keeps_order_and_is_keyed_by_epoch_and_index(store, tmp_path):
    from ctclip.data.reports import sample_sentences, split_sentences

    text = "Findings: Heart size is normal. No pleural effusion was detected. A 12.5 mm nodule. Impression: Nodule."
    assert split_sentences(text) == ["Findings: Heart size is normal.", "No pleural effusion was detected.",
                                     "A 12.5 mm nodule.", "Impression: Nodule."]
    rng = np.random.default_rng(0)
    draws = [sample_sentences(text, 0.3, rng) for _ in range(300)]
    assert all(d and all(s in split_sentences(text) for s in split_sentences(d)) for d in draws)
    for d in draws:  # the report's order is kept
        idx = [split_sentences(text).index(s) for s in split_sentences(d)]
        assert idx == sorted(idx)
    kept = np.mean([len(split_sentences(d)) for d in draws])
    assert 1.2 < kept < 2.0  # 4 x 0.3, plus the one kept when none was drawn
    assert sample_sentences(text, 1.0, rng) == text and sample_sentences("", 0.3, rng) == ""
    rows = [[f"valid_{i}_a_1.nii.gz", "", "", text, "Nodule."] for i in range(5)]
    csv_path = _reports(tmp_path, rows)
    a = CTReportDataset(store, csv_path, sentence_keep=0.4, seed=7)
    b = CTReportDataset(store, csv_path, sentence_keep=0.4, seed=7)
    epoch0 = [a[i][1] for i in range(5)]
    assert epoch0 == [b[i][1] for i in range(5)]  # any process, any worker: the same texts
    a.set_epoch(1)
    assert [a[i][1] for i in range(5)] != epoch0
    b.set_epoch(0)
    assert [b[i][1] for i in reversed(range(5))] == epoch0[::-1]  # keyed by index, not by draw order
    assert CTReportDataset(store, csv_path)[0][1] == a.texts[0]  # default: whole reports
    with pytest.raises(ValueError, match="sentence_keep"):
        CTReportDataset(store, csv_path, sentence_keep=0.0)


# ---------------------------------------------------------------- in-plane shift augmentation


@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (2, -3), (-1, 4), (5, 0), (0, -7), (9, 1)])
def test_shift_in_plane_matches_roll_with_air_at_the_edges(dy, dx):
    from ctclip.data.augment import shift_in_plane

    vol = np.random.default_rng(0).integers(1, 256, size=(3, 9, 8)).astype(np.uint8)
    # oracle: numpy's roll, then what wrapped round set to air (0)
    want = np.roll(vol, (dy, dx), axis=(1, 2))
    if dy > 0:
        want[:, :dy] = 0
    elif dy < 0:
        want[:, dy:] = 0
    if dx > 0:
        want[:, :, :dx] = 0
    elif dx < 0:
        want[:, :, dx:] = 0
    got = vol.copy()
    shift_in_plane(got, dy, dx)
    np.testing.assert_array_equal(got, want)


def test_random_shift_stays_in_range_and_is_seeded():
    from ctclip.data.augment import random_shift

    seen = set()
    for seed in range(200):
        v = np.ones((2, 6, 6), dtype=np.uint8)
        dy, dx = random_shift(v, 2, np.random.default_rng(seed))
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        assert v.sum() == 2 * (6 - abs(dy)) * (6 - abs(dx))
        seen.add((dy, dx))
    assert len(seen) == 25  # every shift in the square is drawn
    a, b = np.ones((1, 5, 5), np.uint8), np.ones((1, 5, 5), np.uint8)
    assert random_shift(a, 3, np.random.default_rng(7)) == random_shift(b, 3, np.random.default_rng(7))
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(a, -1, np.random.default_rng(0))


def test_report_dataset_shifts_each_draw_and_leaves_the_store_alone(store, tmp_path):
    from ctclip.data.augment import shift_in_plane

    rows = [[f"valid_{i}_a_1.nii.gz", "", "", "Heart size is normal.", "Normal."] for i in range(5)]
    csv_path = _reports(tmp_path, rows)
    data = CTReportDataset(store, csv_path, seed=3, volume_shift=3)
    plain = CTReportDataset(store, csv_path)

    def expected(index: int, epoch: int) -> np.ndarray:
        dy, dx = np.random.default_rng([3, epoch, index, 1]).integers(-3, 4, size=2)
        v = _vol(data.names[index])
        shift_in_plane(v, int(dy), int(dx))
        return v

    batch = data.__getitems__([4, 1, 2])
    for (vol, _), index in zip(batch, [4, 1, 2], strict=True):
        np.testing.assert_array_equal(vol[0].numpy(), expected(index, 0))
        np.testing.assert_array_equal(data[index][0][0].numpy(), expected(index, 0))  # one item = in a batch
    assert any((data[i][0] == 0).any() for i in range(5))  # some draws uncovered air at an edge
    data.set_epoch(1)
    assert [expected(i, 1).tolist() for i in range(5)] != [expected(i, 0).tolist() for i in range(5)]
    np.testing.assert_array_equal(data[2][0][0].numpy(), expected(2, 1))
    for i in range(5):  # the store is read fresh each time: nothing shifted stays behind
        np.testing.assert_array_equal(plain[i][0][0].numpy(), _vol(plain.names[i]))
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="volume_shift"):
            CTReportDataset(store, csv_path, volume_shift=bad)


def test_single_sentence_views_are_one_sentence_of_the_report(store, tmp_path):
    from ctclip.data.reports import sample_sentences, split_sentences

    text = "Heart size is normal. No pleural effusion was detected. A 12 mm nodule. Impression: Nodule."
    rows = [[f"valid_{i}_a_1.nii.gz", "", "", text, ""] for i in range(5)]
    csv_path = _reports(tmp_path, rows)
    always = CTReportDataset(store, csv_path, seed=1, single_sentence_rate=1.0)
    sentences = split_sentences(always.texts[0])
    views = []
    for epoch in range(8):
        always.set_epoch(epoch)
        views += [always[i][1] for i in range(5)]
    assert all(v in sentences for v in views) and len(set(views)) == len(sentences)  # each sentence drawn
    mixed = CTReportDataset(store, csv_path, seed=1, sentence_keep=0.6, single_sentence_rate=0.5)
    kinds = []
    for epoch in range(8):
        mixed.set_epoch(epoch)
        for i in range(5):
            t = mixed[i][1]
            rng = np.random.default_rng([1, epoch, i])  # the oracle: the documented draw, in order
            single = rng.random() < 0.5
            full = mixed.texts[i]  # the report as the dataset composes it ("Findings: ... Impression: ...")
            want = split_sentences(full)[rng.integers(len(sentences))] if single else sample_sentences(full, 0.6, rng)
            assert t == want
            kinds.append(single)
    assert 0 < sum(kinds) < len(kinds)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="single_sentence_rate"):
            CTReportDataset(store, csv_path, single_sentence_rate=bad)

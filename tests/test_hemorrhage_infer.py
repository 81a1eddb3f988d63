"""scripts/hemorrhage_infer.py end to end: synthetic DICOM studies (compressed series, BitsStored-12 quirk
series, localizers, broken files) and the real head slices, with weights written in the original format
from randomly initialised models (the three full-size architectures at a small input size, and a tiny
DenseNet where only the plumbing is under test).

The reference for the numbers is the original recipe restated here on the prepared PNGs: read, resize
each slice to 512 x 512 and stack [s+1, s, s-1] (its dataset), resize the stack to the model size and crop
the centre 0.8 resized back (its predictor), normalise, model, sigmoid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ctcore.errors import UsageError
from hemorrhage.classes import CLASSES
from hemorrhage.cnn_run import parse_input_sizes
from hemorrhage.inputs import parse_tta
from hemorrhage.models import SEED_ENSEMBLE, build_cnn, load_original_checkpoint, normalize_uint8
from hemorrhage.models.checkpoint import save_original_checkpoint, save_random_weights, sha256_file
from hemorrhage.models.sequence import SequenceConfig, SequenceModel
from hemorrhage.models.sequence_checkpoint import load_sequence_checkpoint, save_sequence_checkpoint
from hemorrhage.run.prepare_worker import png_name
from scripts.hemorrhage_infer import main
from scripts.hemorrhage_prepare import main as prepare

pytestmark = pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")

TINY = ("tiny_densenet", 64)


@pytest.fixture(scope="module")
def full_weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights_full")
    save_random_weights(root, SEED_ENSEMBLE, folds=(0,), seed=1)
    return root


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights_tiny")
    save_random_weights(root, [TINY], folds=(0, 1), seed=2)
    return root


@pytest.fixture(scope="module")
def prepared_png(synthetic_head, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "png"
    assert prepare(["-i", str(synthetic_head / "dicom"), "-o", str(out), "-j", "0"]) == 3  # 2 broken files
    return out


def outputs(pred: Path) -> dict[str, pd.DataFrame | dict]:
    stem = pred.with_suffix("")
    read = lambda p: pd.read_csv(p, dtype={"StudyInstanceUID": str, "SeriesInstanceUID": str,  # noqa: E731
                                          "SOPInstanceUID": str, "flags": str}, keep_default_na=False)
    return {"kaggle": pd.read_csv(pred), "slice": read(f"{stem}_per_slice.csv"), "study": read(f"{stem}_per_study.csv"),
            "errors": pd.read_csv(f"{stem}_errors.csv"), "run": json.loads(Path(f"{stem}_run.json").read_text())}


def intact(t: dict) -> list[int]:
    return [k for k in range(len(t["sop_uids"])) if t["broken"][k] == ""]


def infer(args: list[str]) -> int:
    return main([*args, "--no_progress", "--device", "cpu"])


# ----------------------------------------------------------------------------------------- full-size models


@pytest.fixture(scope="module")
def full_run(synthetic_head, full_weights, tmp_path_factory):
    pred = tmp_path_factory.mktemp("full") / "predictions.csv"
    rc = infer(["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(full_weights), "--output", str(pred),
                "--input_size", "64", "--batch_size", "24", "--num_workers", "2"])
    return rc, pred


def test_full_ensemble_ids_order_and_records(synthetic_head, synthetic_head_truths, full_weights, full_run):
    rc, pred = full_run
    assert rc == 3  # the two broken files
    o = outputs(pred)
    expected_sops = [str(t["sop_uids"][k]) for t in synthetic_head_truths for k in intact(t)]
    kaggle = o["kaggle"]
    assert list(kaggle.columns) == ["ID", "Label"]
    assert sorted(kaggle["ID"]) == sorted(f"{s}_{c}" for s in expected_sops for c in CLASSES)
    assert kaggle["Label"].between(0, 1).all() and kaggle["Label"].notna().all()
    per_slice = o["slice"]
    assert sorted(per_slice["SOPInstanceUID"]) == sorted(expected_sops)
    for t in synthetic_head_truths:  # per-slice rows follow the true position order of each series
        rows = per_slice[per_slice["SeriesInstanceUID"] == str(t["series_uid"])]
        keep = intact(t)
        true_order = [str(t["sop_uids"][k]) for k in sorted(keep, key=lambda k: t["position_along_normal"][k])]
        assert rows["SOPInstanceUID"].tolist() == true_order
        assert np.all(np.diff(rows["slice_index"].to_numpy()) > 0)
    # Kaggle rows = per-slice probabilities
    k = kaggle.set_index("ID")["Label"]
    first = per_slice.iloc[0]
    np.testing.assert_allclose([k[f"{first['SOPInstanceUID']}_{c}"] for c in CLASSES],
                               first[list(CLASSES)].to_numpy(float), rtol=1e-6)
    # per study: max and mean of the per-slice rows, slice counts
    study = o["study"]
    assert len(study) == len(synthetic_head_truths)
    for _, row in study.iterrows():
        rows = per_slice[per_slice["SeriesInstanceUID"] == row["SeriesInstanceUID"]]
        assert row["n_slices"] == len(rows)
        np.testing.assert_allclose(row[[f"max_{c}" for c in CLASSES]].to_numpy(float), rows[list(CLASSES)].max().to_numpy(float), rtol=1e-5)
        np.testing.assert_allclose(row[[f"mean_{c}" for c in CLASSES]].to_numpy(float), rows[list(CLASSES)].mean().to_numpy(float), rtol=1e-5)
    broken = pd.read_csv(synthetic_head / "broken.csv")
    assert sorted(Path(p).name for p in o["errors"]["path"]) == sorted(Path(p).name for p in broken["path"])
    run = o["run"]
    members = {m["model"]: m for m in run["ensemble"]["members"]}
    assert set(members) == {n for n, _ in SEED_ENSEMBLE}
    assert all(m["input_size"] == 64 for m in members.values())
    for m in members.values():
        (f,) = m["folds"]
        assert f["sha256"] == sha256_file(f["path"]) and "randomly initialised" in f["note"]
    assert run["input"]["left_out"].get("localizer", 0) > 0
    assert run["input"]["bits_stored_12_fixed"] == sum(len(intact(t)) for t in synthetic_head_truths if t["quirk"])
    assert run["weights_notes"] and run["device"]["type"] == "cpu"


def test_real_head_slices_and_one_slice_series(samples, full_weights, tmp_path):
    data = tmp_path / "real"
    for i, key in enumerate(["head_j2k_pixelrep", "head_693_uncr", "head_693_unci", "head_693_j2kr",
                             "head_693_j2ki", "chest_ct_small"]):
        (data / f"d{i}").mkdir(parents=True)
        shutil.copy(getattr(samples, key), data / f"d{i}" / f"IM{i}")
    pred = tmp_path / "out" / "p.csv"
    assert infer(["--data_dir", str(data), "--weights_dir", str(full_weights), "--output", str(pred),
                  "--input_size", "64", "--num_workers", "0", "--models", "DenseNet121_change_avg"]) == 0
    o = outputs(pred)
    s = o["slice"]
    # three series: the J2K slice alone, the 693 slice's two SOPs (same position, flagged), the chest slice
    assert s["SeriesInstanceUID"].nunique() == 3 and len(s) == 4
    assert s["flags"].str.contains("duplicate_position").sum() == 2
    assert o["run"]["input"]["left_out"] == {"duplicate_sop": 2}
    assert [m["model"] for m in o["run"]["ensemble"]["members"]] == ["DenseNet121_change_avg"]
    assert (o["study"]["n_slices"].sort_values().tolist()) == [1, 1, 2]


# ----------------------------------------------------------------------------------------- numbers


def reference_probs(png_dir: Path, sops: list[str], weights: Path, size: int, crop: float = 0.8) -> np.ndarray:
    """The original recipe on prepared PNGs of one series (slices in order): mean over the fold files."""
    imgs = [cv2.resize(cv2.imread(str(png_dir / png_name(s)), cv2.IMREAD_GRAYSCALE), (512, 512)) for s in sops]
    n = len(imgs)
    x = np.stack([cv2.resize(np.stack([imgs[min(i + 1, n - 1)], imgs[i], imgs[max(i - 1, 0)]], -1), (size, size))
                  for i in range(n)])
    t = int(size * crop)
    a = (size - t) // 2
    x = np.stack([cv2.resize(np.ascontiguousarray(im[a:a + t, a:a + t]), (size, size)) for im in x])
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    xt = (xt.float() / 255 - 0.456) / 0.224
    out = []
    for f in sorted((weights / f"{TINY[0]}_{TINY[1]}").glob("*.pth")):
        model = build_cnn(TINY[0])
        load_original_checkpoint(model, f)
        with torch.no_grad():
            out.append(torch.sigmoid(model.eval()(xt)).numpy())
    return np.mean(out, 0)


@pytest.fixture(scope="module")
def tiny_run(synthetic_head, tiny_weights, tmp_path_factory):
    pred = tmp_path_factory.mktemp("tiny") / "predictions.csv"
    # batch 5: batches straddle series and series straddle batches
    rc = infer(["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(tiny_weights), "--output", str(pred),
                "--batch_size", "5", "--num_workers", "0"])
    return rc, pred


def test_probabilities_equal_the_original_recipe(synthetic_head_truths, tiny_run, tiny_weights, prepared_png):
    rc, pred = tiny_run
    assert rc == 3
    s = outputs(pred)["slice"]
    for t in synthetic_head_truths:
        rows = s[s["SeriesInstanceUID"] == str(t["series_uid"])]
        ref = reference_probs(prepared_png / "png", rows["SOPInstanceUID"].tolist(), tiny_weights, 64)
        np.testing.assert_allclose(rows[list(CLASSES)].to_numpy(), ref, atol=2e-5)


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_prepared_folder_gives_the_same_predictions(synthetic_head, tiny_run, tiny_weights, prepared_png, fmt,
                                                    tmp_path):
    src = prepared_png
    if fmt == "npz":
        src = tmp_path / "npz"
        assert prepare(["-i", str(synthetic_head / "dicom"), "-o", str(src), "-j", "0", "--format", "npz"]) == 3
    pred = tmp_path / "p.csv"
    assert infer(["--data_dir", str(src), "--weights_dir", str(tiny_weights), "--output", str(pred),
                  "--num_workers", "0"]) == 3  # the prepare run's failed files are listed again
    a, b = outputs(pred), outputs(tiny_run[1])
    assert a["run"]["input"]["kind"] == "prepared"
    pd.testing.assert_frame_equal(a["kaggle"].sort_values("ID").reset_index(drop=True),
                                  b["kaggle"].sort_values("ID").reset_index(drop=True), atol=1e-6)


def test_tta_modes(synthetic_head, tiny_weights, tiny_run, tmp_path):
    base = outputs(tiny_run[1])["slice"]
    common = ["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(tiny_weights), "--num_workers", "0"]
    runs = {}
    for name, tta, seed in [("flip", "flip", "0"), ("r0", "3", "0"), ("r0b", "random:3", "0"), ("r1", "3", "1")]:
        pred = tmp_path / name / "p.csv"
        assert infer([*common, "--output", str(pred), "--tta", tta, "--seed", seed]) == 3
        runs[name] = outputs(pred)["slice"][list(CLASSES)].to_numpy()
    assert not np.allclose(runs["flip"], base[list(CLASSES)].to_numpy(), atol=1e-4)
    np.testing.assert_array_equal(runs["r0"], runs["r0b"])  # same seed, same draws
    assert not np.allclose(runs["r0"], runs["r1"], atol=1e-4)
    assert "flip" in outputs(tmp_path / "flip" / "p.csv")["run"]["ensemble"]["tta"]


def test_flip_set_is_the_mean_of_its_four_passes(tiny_weights):
    from hemorrhage.ensemble import CNNEnsemble
    from hemorrhage.models.checkpoint import find_weights

    inv = find_weights(tiny_weights)
    x = torch.randint(0, 256, (1, 3, 3, 64, 64), dtype=torch.uint8)
    ens = CNNEnsemble.load(inv, torch.device("cpu"), flip_tta=True)
    got = ens.predict({64: x})["tiny_densenet_64"].probs  # (3, folds, 6)
    model = ens.members[0].models[0]
    views = [x[0], x[0].flip(-1), x[0].flip(1), x[0].flip(1).flip(-1)]
    with torch.no_grad():
        want = torch.stack([torch.sigmoid(model(normalize_uint8(v))) for v in views]).mean(0)
    torch.testing.assert_close(got[:, 0], want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- sequence head


def test_sequence_head(synthetic_head, tiny_weights, tiny_run, tmp_path):
    torch.manual_seed(0)
    head = SequenceModel(SequenceConfig(num_models=1, hidden=8, conv_width=8, use_slice_gap=True))
    path = save_sequence_checkpoint(head, tmp_path / "seq" / "sequence_fold0.pth", [TINY], epoch=3, val_loss=0.5,
                                    fold=0)
    back = load_sequence_checkpoint(path)
    assert back.members == [TINY] and back.fold == 0 and back.model.cfg.use_slice_gap
    pred = tmp_path / "p.csv"
    args = ["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(tiny_weights), "--output", str(pred),
            "--num_workers", "0", "--sequence_weights", str(tmp_path / "seq")]
    assert infer(args) == 3
    o = outputs(pred)
    s, base = o["slice"], outputs(tiny_run[1])["slice"]
    cnn = [f"cnn_{c}" for c in CLASSES]
    np.testing.assert_allclose(s[cnn].to_numpy(), base[list(CLASSES)].to_numpy(), atol=1e-6)  # CNN part unchanged
    assert not np.allclose(s[list(CLASSES)].to_numpy(), s[cnn].to_numpy(), atol=1e-3)
    assert s[list(CLASSES)].stack().between(0, 1).all()
    (h,) = o["run"]["sequence_heads"]
    assert h["members"] == ["tiny_densenet_64"] and o["run"]["sequence_cnn_folds"] == [0, 1]


def test_sequence_head_that_reads_other_models_is_refused_before_reading_images(synthetic_head, tiny_weights,
                                                                                tmp_path, caplog):
    head = SequenceModel(SequenceConfig(num_models=1, hidden=8, conv_width=8))
    save_sequence_checkpoint(head, tmp_path / "seq.pth", [("DenseNet121_change_avg", 512)], epoch=1, val_loss=1.0)
    pred = tmp_path / "p.csv"
    args = ["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(tiny_weights), "--output", str(pred),
            "--num_workers", "0", "--sequence_weights", str(tmp_path / "seq.pth")]
    assert infer(args) == 2
    assert "DenseNet121_change_avg_512" in caplog.text and not pred.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert infer([*args[:-1], str(tmp_path / "junk.pth")]) == 2
    assert "junk.pth is not a readable PyTorch checkpoint" in caplog.text


# ----------------------------------------------------------------------------------------- bad input


def test_bad_weights_are_reported_before_any_image_is_read(synthetic_head, tmp_path, caplog, monkeypatch):
    import hemorrhage.run.inference as inference

    def no_reading(*a, **k):
        raise AssertionError("images were read despite unusable weights")

    monkeypatch.setattr(inference, "find_series", no_reading)
    w = tmp_path / "w"
    save_random_weights(w, [TINY], folds=(0,), seed=0)
    pred = tmp_path / "p.csv"
    common = ["--data_dir", str(synthetic_head / "dicom"), "--output", str(pred), "--num_workers", "0"]
    assert infer([*common, "--weights_dir", str(w), "--folds", "0", "1"]) == 2  # fold 1 asked for, absent
    assert "model_epoch_best_1.pth" in caplog.text
    # a DenseNet121 file in the tiny folder: names the mismatch and what the file holds
    save_original_checkpoint(build_cnn("DenseNet121_change_avg"), w / "tiny_densenet_64" / "model_epoch_best_0.pth",
                             epoch=1, val_loss=0.1)
    assert infer([*common, "--weights_dir", str(w)]) == 2
    assert "does not fit tiny_densenet" in caplog.text and "holds a DenseNet121_change_avg checkpoint" in caplog.text
    assert infer([*common, "--weights_dir", str(tmp_path / "nowhere")]) == 2
    assert infer([*common, "--weights_dir", str(w), "--models", "DenseNet169_change_avg"]) == 2
    assert "no weights folder for 'DenseNet169_change_avg'" in caplog.text
    assert not pred.exists()


def test_bad_input_folders(tiny_weights, tmp_path, caplog, samples):
    pred = tmp_path / "p.csv"
    common = ["--weights_dir", str(tiny_weights), "--output", str(pred), "--num_workers", "0"]
    assert infer([*common, "--data_dir", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert infer([*common, "--data_dir", str(tmp_path / "empty")]) == 2
    assert "no CT series" in caplog.text
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "IM0001").write_bytes(b"\0" * 300)  # not DICOM
    assert infer([*common, "--data_dir", str(notes)]) == 2
    assert not pred.exists()
    for bad in (["--tta", "many"], ["--window", "wide"], ["--input_size", "nope=64"], ["--center_crop", "1.5"]):
        one = tmp_path / "one"
        one.mkdir(exist_ok=True)
        shutil.copy(samples.head_693_uncr, one / "IM1")
        assert infer([*common, "--data_dir", str(one), *bad]) == 2


def test_a_slice_that_fails_to_decode_is_skipped_and_listed(synthetic_head, synthetic_head_truths, tiny_weights,
                                                           tmp_path, monkeypatch):
    import hemorrhage.inference_data as data
    from hemorrhage.dicom import DicomReadError

    t = next(t for t in synthetic_head_truths if len(intact(t)) > 3)
    victim = str(synthetic_head / str(t["paths"][intact(t)[1]]))
    real = data.slice_image

    def flaky(path, *a, **k):
        if str(path) == victim:
            raise DicomReadError(path, "JPEG 2000 codestream is corrupt")
        return real(path, *a, **k)

    monkeypatch.setattr(data, "slice_image", flaky)
    pred = tmp_path / "p.csv"
    assert infer(["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(tiny_weights), "--output",
                  str(pred), "--num_workers", "0"]) == 3
    o = outputs(pred)
    err = o["errors"].set_index("path")
    assert err.loc[victim, "stage"] == "pixels" and "corrupt" in err.loc[victim, "error"]
    row = o["study"][o["study"]["SeriesInstanceUID"] == str(t["series_uid"])].iloc[0]
    assert row["n_failed"] == 1 and "missing_slices" in row["flags"]
    assert row["n_slices"] == len(intact(t)) - 1


# ----------------------------------------------------------------------------------------- settings


def test_parse_tta_and_input_sizes():
    assert parse_tta("0").mode == "none" and parse_tta("flip").total_passes == 4
    assert parse_tta("10").passes == 10 and parse_tta("random").passes == 10 and parse_tta("random:2").passes == 2
    for bad in ("-1", "x", "random:0"):
        with pytest.raises(ValueError):
            parse_tta(bad)
    labels = ["se_resnext101_32x4d_256", "DenseNet121_change_avg_512"]
    assert parse_input_sizes(["128"], labels) == dict.fromkeys(labels, 128)
    assert parse_input_sizes(["DenseNet121_change_avg=384"], labels) == {"DenseNet121_change_avg_512": 384}
    with pytest.raises(UsageError):
        parse_input_sizes(["16"], labels)


# ----------------------------------------------------------------------------------------- study figure


def test_study_figure_of_the_most_suspicious_series(tiny_run, synthetic_head, tmp_path, caplog):
    """The figure script draws the series with the highest p(any), shows its top slice, marks the labels,
    and names the file when an input is missing or the series is unknown."""
    import matplotlib.image

    from hemorrhage.run.study_figure import shown_slices
    from scripts.hemorrhage_plot_study import main as plot_study

    _, pred = tiny_run
    per_slice = pd.read_csv(pred.with_name("predictions_per_slice.csv"), dtype=str)
    top_series = per_slice.loc[per_slice["any"].astype(float).idxmax(), "SeriesInstanceUID"]
    out = tmp_path / "study.png"
    assert plot_study(["--predictions", str(pred), "--labels", str(synthetic_head / "labels.csv"),
                       "-o", str(out), "--n_images", "4"]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600
    from hemorrhage.run.study_figure import StudyFigureConfig, plot_series

    drawn = plot_series(StudyFigureConfig(pred, tmp_path / "again.png", labels=synthetic_head / "labels.csv",
                                          n_images=4))
    rows = per_slice[per_slice["SeriesInstanceUID"] == top_series]
    assert drawn["series"] == top_series and drawn["n_slices"] == len(rows) and drawn["labelled"]
    assert int(rows["any"].astype(float).to_numpy().argmax()) in drawn["shown"] and len(drawn["shown"]) == 4

    assert shown_slices(np.array([0.1, 0.2, 0.9]), 8) == [0, 1, 2]
    assert shown_slices(np.array([0.0] * 10 + [1.0] + [0.0] * 9), 4) == [0, 6, 10, 19]  # 13, the nearest pick, gives way to 10

    caplog.set_level("ERROR")
    assert plot_study(["--predictions", str(pred), "--series", "1.2.3", "-o", str(tmp_path / "x.png")]) == 2
    assert "predictions_per_slice.csv: no series '1.2.3'" in caplog.text
    assert plot_study(["--predictions", str(tmp_path / "nothing.csv"), "-o", str(tmp_path / "x.png")]) == 2
    assert "nothing_per_slice.csv: missing" in caplog.text
    assert not (tmp_path / "x.png").exists()

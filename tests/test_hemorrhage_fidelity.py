"""Two points where the toolkit meets the original's data path, end to end on synthetic DICOM studies:

- the two-step resize (each slice to 512 x 512 when the neighbours are stacked, then the stack to the
  model size) holds in every path that makes model inputs: inference, feature extraction and training
  samples from a prepared npz folder, for 128 x 128 and 600 x 600 slices. The oracle is the original's
  recipe restated with plain cv2 calls (`tests/test_hemorrhage_inputs.py`) on the prepared PNGs; the
  inputs the models receive are caught at `CNNEnsemble.predict`.
- a slice without WindowCenter/WindowWidth, which the original could not prepare, is windowed with brain
  40/80 and counted: the manifest's window_fallback column and the run's count, in prepare and inference
  (from the DICOM files and from a prepared folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from hemorrhage.augment import AugmentConfig
from hemorrhage.ensemble import CNNEnsemble
from hemorrhage.inference_data import find_series
from hemorrhage.inputs import slice_image
from hemorrhage.models.checkpoint import save_random_weights
from hemorrhage.run.prepare_worker import png_name
from hemorrhage.train_data import TrainSeries, TrainSlices
from hemorrhage.windows import BRAIN, WindowSpec, has_window, header_window, parse_window_spec
from scripts.hemorrhage_extract_features import main as extract
from scripts.hemorrhage_infer import main as infer
from scripts.hemorrhage_make_synthetic import main as make_synthetic
from scripts.hemorrhage_prepare import main as prepare
from tests.test_hemorrhage_inputs import original_inputs

pytestmark = pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
SYNTH = str(ROOT / "configs" / "hemorrhage" / "synthetic_small.yaml")
SIZE = 64  # the tiny model's input size (its folder name)
QUIET = ["--no_progress", "--num_workers", "0"]


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def intact_series(truths: list[dict], n: int) -> list[dict]:
    """`n` series of the session set whose files all decode."""
    good = [t for t in truths if (t["broken"] == "").all()]
    assert len(good) >= n
    return good[:n]


def copy_series(src_root: Path, t: dict, dest: Path) -> list[Path]:
    """The series' files under dest/, in position order."""
    dest.mkdir(parents=True, exist_ok=True)
    order = np.argsort(t["position_along_normal"])
    out = []
    for k in order:
        src = src_root / str(t["paths"][k])
        out.append(dest / src.name)
        shutil.copy(src, out[-1])
    return out


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fidelity_weights")
    save_random_weights(root, [("tiny_densenet", SIZE)], folds=(0,), seed=7)
    return root


# ----------------------------------------------------------------------------------------- two-step resize


@pytest.fixture(scope="module")
def two_sizes(synthetic_head, synthetic_head_truths, tmp_path_factory) -> Path:
    """One DICOM tree with two series of 128 x 128 slices and one study of 600 x 600 slices."""
    root = tmp_path_factory.mktemp("two_sizes")
    big = root / "big"
    assert make_synthetic(["--config", SYNTH, "--out_dir", str(big), "--n_studies", "1", "--size", "600",
                           "--slices", "4", "--seed", "5", "--broken", "0", "--localizer_share", "0",
                           "--thin_share", "0"]) == 0
    data = root / "dicom"
    shutil.copytree(big / "dicom", data / "big")
    for i, t in enumerate(intact_series(synthetic_head_truths, 2)):
        copy_series(synthetic_head, t, data / f"small{i}")
    return data


@pytest.fixture(scope="module")
def caught(two_sizes, tiny_weights, tmp_path_factory) -> dict:
    """Prepared PNGs (the oracle's source), and the uint8 inputs that inference and feature extraction
    handed to the models, in stream order, with inference's per-slice rows (the same order)."""
    root = tmp_path_factory.mktemp("caught")
    assert prepare(["-i", str(two_sizes), "-o", str(root / "png"), "-j", "0"]) == 0
    seen: dict[str, list[torch.Tensor]] = {"infer": [], "extract": []}
    real = CNNEnsemble.predict
    with pytest.MonkeyPatch.context() as mp:
        for run in seen:
            def spy(self, inputs, want_features=False, _run=run):
                seen[_run].append(inputs[SIZE][0].clone())  # (slices, 3, h, w): one pass, no random TTA
                return real(self, inputs, want_features)

            mp.setattr(CNNEnsemble, "predict", spy)
            if run == "infer":
                assert infer(["--data_dir", str(two_sizes), "--weights_dir", str(tiny_weights), "--output",
                              str(root / "pred" / "p.csv"), "--device", "cpu", *QUIET]) == 0
            else:
                assert extract(["--data_dir", str(two_sizes), "--weights_dir", str(tiny_weights), "--output_dir",
                                str(root / "features"), "--folds_csv", "none", "--device", "cpu", *QUIET]) == 0
    rows = read(root / "pred" / "p_per_slice.csv")
    return {"png": root / "png", "rows": rows, **{k: torch.cat(v).numpy() for k, v in seen.items()}}


def png_slices(png_dir: Path, sops: list[str]) -> list[np.ndarray]:
    return [cv2.imread(str(png_dir / "png" / png_name(s)), cv2.IMREAD_GRAYSCALE) for s in sops]


def test_inference_inputs_are_the_original_recipe(caught):
    rows = caught["rows"]
    expected, shapes = [], set()
    for series in dict.fromkeys(rows["SeriesInstanceUID"]):  # stream order
        slices = png_slices(caught["png"], rows.loc[rows["SeriesInstanceUID"] == series, "SOPInstanceUID"].tolist())
        shapes.add(slices[0].shape)
        expected.append(original_inputs(slices, SIZE, crop=0.8))
    assert shapes == {(128, 128), (600, 600)}
    assert caught["infer"].shape == (len(rows), 3, SIZE, SIZE)
    np.testing.assert_array_equal(caught["infer"], np.concatenate(expected))


def test_feature_extraction_sees_the_inference_inputs(caught):
    np.testing.assert_array_equal(caught["extract"], caught["infer"])


def test_training_samples_from_npz_are_the_original_recipe(two_sizes, caught, tmp_path):
    """A prepared npz folder (what hemorrhage_train.py makes of a DICOM tree) through `TrainSlices` with the
    augmentation switched off: every sample is the original's stack resized to the model size."""
    assert prepare(["-i", str(two_sizes), "-o", str(tmp_path / "npz"), "-j", "0", "--format", "npz"]) == 0
    jobs, _ = find_series(tmp_path / "npz", progress=False)
    series = [TrainSeries(j, np.zeros((j.n_slices, 6), np.float32)) for j in jobs]
    off = AugmentConfig(p_reverse=0, p_hflip=0, p_shift_scale_rotate=0, p_erase=0, crop_ratio=(1, 1))
    samples = TrainSlices(series, SIZE, 0, off)
    sides = set()
    for k, s in enumerate(series):
        slices = png_slices(caught["png"], s.job.sop_uids)
        sides.add(slices[0].shape[0])
        expected = original_inputs(slices, SIZE)
        for i in range(s.job.n_slices):
            x, _ = samples[(k, i, 0, 0)]
            np.testing.assert_array_equal(x.numpy(), expected[i])
    assert sides == {128, 600}


# ----------------------------------------------------------------------------------------- window fallback


def test_has_window_and_who_falls_back():
    assert has_window((40.0,), (80.0,)) and has_window((40.0, 300.0), (80.0, 2000.0))
    for center, width in (((), ()), ((40.0,), ()), ((), (80.0,)), ((40.0,), (0.0,)), ((float("nan"),), (80.0,))):
        assert not has_window(center, width)
        assert header_window(center, width) == BRAIN
        assert WindowSpec("header").falls_back(center, width)
        assert not WindowSpec("three").falls_back(center, width)  # the header window is not used there
        assert not parse_window_spec("40/80").falls_back(center, width)
    assert not WindowSpec("header").falls_back((40.0,), (80.0,))


@pytest.fixture(scope="module")
def windowless(synthetic_head, synthetic_head_truths, tmp_path_factory) -> dict:
    """Two intact series; three slices of the first lose WindowCenter and WindowWidth."""
    data = tmp_path_factory.mktemp("windowless") / "dicom"
    first, second = intact_series(synthetic_head_truths, 2)
    paths = copy_series(synthetic_head, first, data / "a")
    copy_series(synthetic_head, second, data / "b")
    stripped = [paths[i] for i in (0, 2, len(paths) - 1)]
    for p in stripped:
        ds = pydicom.dcmread(p)
        del ds.WindowCenter, ds.WindowWidth
        ds.save_as(p)
    sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in stripped}
    return {"data": data, "paths": {str(p) for p in stripped}, "sops": sops}


def test_prepare_counts_the_fallback_and_uses_the_brain_window(windowless, tmp_path, capsys):
    out = tmp_path / "prep"
    assert prepare(["-i", str(windowless["data"]), "-o", str(out), "-j", "0"]) == 0
    assert "3 without a header window (brain 40/80)" in capsys.readouterr().out
    m = read(out / "manifest.csv")
    flagged = m[m["window_fallback"] == "1"]
    assert set(flagged["SOPInstanceUID"]) == windowless["sops"]
    assert set(m["window_fallback"]) == {"0", "1"} and (flagged["window"] == str(BRAIN)).all()
    for p in windowless["paths"]:  # the image is the brain-window image of the slice
        _, brain, _ = slice_image(p, parse_window_spec("brain"))
        sop = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        np.testing.assert_array_equal(cv2.imread(str(out / "png" / png_name(sop)), cv2.IMREAD_GRAYSCALE), brain)
    assert prepare(["-i", str(windowless["data"]), "-o", str(tmp_path / "three"), "-j", "0", "--window",
                    "three"]) == 0
    assert set(read(tmp_path / "three" / "manifest.csv")["window_fallback"]) == {"0"}  # no header window used


@pytest.mark.parametrize("source", ["dicom", "prepared"])
def test_inference_counts_the_fallback(windowless, tiny_weights, tmp_path, source):
    data = windowless["data"]
    if source == "prepared":
        data = tmp_path / "prep"
        assert prepare(["-i", str(windowless["data"]), "-o", str(data), "-j", "0", "--format", "npz"]) == 0
    pred = tmp_path / "p.csv"
    assert infer(["--data_dir", str(data), "--weights_dir", str(tiny_weights), "--output", str(pred),
                  "--device", "cpu", *QUIET]) == 0
    run = json.loads((tmp_path / "p_run.json").read_text())
    assert run["input"]["window_fallback"] == 3
    per_slice = read(tmp_path / "p_per_slice.csv")
    assert set(per_slice.loc[per_slice["window_fallback"] == "1", "SOPInstanceUID"]) == windowless["sops"]
    if source == "dicom":
        m = read(tmp_path / "p_manifest.csv")
        assert {str(data / p) for p in m.loc[m["window_fallback"] == "1", "path"]} == windowless["paths"]
        assert set(m["window_fallback"]) == {"0", "1"}


def test_heads_from_before_the_two_step_resize_are_flagged():
    from types import SimpleNamespace

    from hemorrhage.cnn_run import input_mismatches
    from hemorrhage.inputs import RESIZE_RECIPE

    now = {"tta": "none", "window": "header window", "center_crop": 0.8, "resize": RESIZE_RECIPE}
    old = SimpleNamespace(path=Path("sequence_fold0.pth"), inputs={"tta": "none", "window": "header window",
                                                                    "center_crop": 0.8})
    new = SimpleNamespace(path=Path("sequence_fold1.pth"), inputs=dict(now))
    warnings = input_mismatches([old, new], now)  # type: ignore[list-item]
    assert len(warnings) == 1 and "sequence_fold0.pth" in warnings[0]
    assert "one resize to the model size" in warnings[0] and "not 512x512" in warnings[0]

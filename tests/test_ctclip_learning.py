"""Learning regression: the from-scratch chest model must keep learning, so that a change that stops it
(the per-slice min-max that erased density, the tiny ViT that never left the prior, two towers stuck at
a contrastive loss of ln(batch), prompts read on a different footing than the reports) fails here and
not only in the 15-minute benchmark.

One small synthetic set (600 patients, 32 x 32 x 16, one scan each; 420 training and 170 test volumes),
then
- the image side (tiny_cnn + fusion + a linear head, BCE on the labels: benchmarks/bench_probe_ctclip.py)
  finds the easiest findings on held-out patients, and beats chance over all of them;
- the full 3D CLIP (configs/ctclip/train_learning.yaml's recipe at this size, 300 steps) brings its
  contrastive loss well below ln(batch) and reads the easiest findings zero-shot, with CT-CLIP's prompt
  pair, on the held-out patients.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_learning_ctclip as bench
from benchmarks import bench_probe_ctclip as probe

ROOT = Path(__file__).resolve().parents[1]
SIZE, SLICES = 32, 16
# measured at 150 steps (~10 CPU-s) with tiny_cnn.yaml's fusion pooling (max) and slice histograms (32 bins):
# arterial wall calcification 0.99, emphysema 0.97, mosaic attenuation 0.97, medical material 0.95, all 18
# findings 0.74 (170 test volumes; chance 0.5 +- ~0.05). On 300 patients before emphysema was planted as
# confluent low attenuation the four easiest were mosaic 0.99, aortic calcification 0.97, pleural effusion
# 0.79 and medical material 0.76, all 18 0.62.
ARM = "tiny_cnn:window:max:h32"
EASY = ("Arterial wall calcification", "Emphysema", "Mosaic attenuation pattern", "Medical material")
# zero-shot after 300 CLIP steps (~100 CPU-s). Which easy findings a run this short reads varies between runs
# (training seeds, and even the same seed on another hour: multi-threaded float sums differ): with the
# granulometry branch (tiny_cnn.yaml), seed 42: aortic calcification 0.94, pleural effusion 0.86, emphysema
# 0.82, medical material 0.75, mosaic 0.61, macro 0.656 [0.634, 0.680]; seed 7: medical material 0.88,
# aortic calcification 0.87, emphysema 0.80, pleural effusion 0.68, mosaic 0.52, macro 0.624 [0.603,
# 0.642]; two more runs had mosaic or emphysema at 0.55-0.57 with aortic calcification at 0.90. So the test
# asks that the best three of five easy findings are each >= 0.65 (at chance, with ~170 test volumes, one
# finding reaches 0.65 about once in a thousand runs) and that the macro's lower bound is above 0.55. With
# the mediastinal window added to train_learning.yaml (slice_norm: window_mediastinal), seed 42: aortic
# calcification 0.89, mosaic 0.85, emphysema 0.72, medical material and pleural effusion 0.71, macro 0.627
# [0.605, 0.649] (passed in two runs).
ZERO_SHOT_EASY = ("Arterial wall calcification", "Emphysema", "Mosaic attenuation pattern", "Medical material",
                  "Pleural effusion")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("learning")
    (w / "synth.yaml").write_text(
        f"n_patients: 600\nsize: [{SIZE}, {SIZE}]\nslices: {SLICES}\nvalid_fraction: 0.3\nscans_per_patient: [1, 1]\n"
        "recons_per_scan: [1, 1]\nempty_impression_rate: 0.1\nintercept_8192_rate: 0.0\nnoise_hu: [8.0, 20.0]\n"
        "seed: 0\n")
    (w / "prep.yaml").write_text(f"target_shape: [{SLICES}, {SIZE}, {SIZE}]\nnum_workers: 0\n")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--ctclip_synth_config", str(w / "synth.yaml"), "--ctclip_preprocess_config",
                              str(w / "prep.yaml"), "--ctclip_val_volumes", "10"])
    split = bench.build_data(args, w / "ct_rate", {})
    assert split["test"]["volumes"] >= 150
    return w / "ct_rate"


def test_image_side_learns_the_easy_findings_on_held_out_patients(small_set, tmp_path):
    out = tmp_path / "probe.json"
    assert probe.main(["--data_dir", str(small_set), "--arms", ARM, "--image_size", str(SIZE),
                       "--max_steps", "150", "--minutes", "60", "--eval_every", "1000", "--json", str(out)]) == 0
    per = json.loads(out.read_text())["arms"][ARM]["per_finding"]
    assert min(per[f] for f in EASY) >= 0.65, per
    assert np.mean([per[f] for f in EASY]) >= 0.7, per
    assert np.mean(list(per.values())) >= 0.56, per


@pytest.mark.timeout(1200)  # ~100 CPU-s alone; a hang guard with room for a loaded 2-core machine
def test_the_3d_clip_reads_the_easy_findings_zero_shot_on_held_out_patients(small_set, tmp_path):
    from ctclip.models.factory import ModelChoice, configs_dir
    from ctclip.run.evaluate import EvalConfig, evaluate
    from ctclip.run.train import TrainConfig, train
    from ctcore.cli import parse_args, to_config
    from scripts.ctclip_train import build_parser

    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(configs_dir().joinpath("tiny_cnn.yaml").read_text()
                          .replace("image_size: 64", f"image_size: {SIZE}"))
    argv = ["--config", str(ROOT / "configs" / "ctclip" / "train_learning.yaml"), "--model_config", str(model_yaml),
            "--ct_filepath", str(small_set / "train_volumes.h5"), "--txt_filepath", str(small_set / "train_reports.csv"),
            "--output_dir", str(tmp_path / "run"), "--device", "cpu", "--max_steps", "300", "--max_minutes", "60",
            "--log_interval", "1", "--valid_interval", "100000",
            # the text-view term pays off over the benchmark's ~1,600 steps and slows these 300 (seed 42: macro
            # 0.588 [0.567, 0.611] with it, mosaic at chance, against 0.627 without): the test keeps its margins.
            # The sentence-image term is off too: the margins below were set without either extra term
            "--text_view_weight", "0", "--sentence_weight", "0",
            # and every slice in each step (the benchmark's config encodes every other slice: cheaper steps for its
            # CPU budget; this test counts steps, not CPU time)
            "--slice_keep", "1",
            # and the learning rate its margins were set with (the benchmark's config uses 1.5e-3 for its ~2,000 steps)
            "--lr", "0.001"]
    targs = parse_args(build_parser(), argv)
    summary = train(to_config(TrainConfig, targs, model=to_config(ModelChoice, targs).resolve()))
    assert summary["steps"] == 300
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    # ln(32) = 3.47 is where both towers stay when they cannot start to agree (an old set-up: 3.46-3.48 for
    # 400 steps); here it is ~1.6-1.9 around step 100 (and ~0.2 at 300: the 420 volumes are memorised)
    assert np.mean(losses[90:100]) < math.log(32) - 1.0, losses[90:100]
    result = evaluate(EvalConfig(model_path=tmp_path / "run" / "latest.pt", test_data=small_set / "valid_volumes.h5",
                                 test_labels=small_set / "test_predicted_labels.csv", output_dir=tmp_path / "eval",
                                 templates="ctclip", n_bootstrap=200, num_workers=0, device="cpu"))
    per = {f: v["values"]["auroc"] for f, v in result["findings"].items()}
    best = sorted(per[f] for f in ZERO_SHOT_EASY)[-3:]
    assert min(best) >= 0.65, per
    macro = result["macro"]["auroc"]
    assert macro["value"] >= 0.58 and macro["lower"] > 0.55, macro


def test_probe_names_bad_inputs_before_training(tmp_path, capsys):
    assert probe.main(["--data_dir", str(tmp_path), "--arms", "tiny_cnn:window"]) == 2
    assert "'tiny_cnn:window'" in capsys.readouterr().err
    for arm, why in (("tiny_cnn:window:max:32", "the fields after POOL are hN"), ("tiny_cnn:window:max:h0", "N > 0"),
                     ("tiny_cnn:window:max:h32:h32", "each at most once"), ("tiny_cnn:window:max:g0", "M > 0"),
                     ("tiny_cnn:window:max:h32:g3:g3", "expected 'pooled', 'hist' or"),
                     ("tiny_vit:window:max:h32", "(gM) are tiny_cnn settings"),
                     ("tiny_vit:window:max:g3", "(gM) are tiny_cnn settings")):
        assert probe.main(["--data_dir", str(tmp_path), "--arms", "pooled", arm]) == 2
        assert why in capsys.readouterr().err
    assert probe.main(["--data_dir", str(tmp_path), "--shift", "-1"]) == 2
    assert "--shift must be >= 0, got -1" in capsys.readouterr().err
    assert probe.main(["--data_dir", str(tmp_path / "missing")]) == 2
    assert "train_volumes.h5: no such file" in capsys.readouterr().err
    (tmp_path / "train_volumes.h5").write_bytes(b"")
    (tmp_path / "train_predicted_labels.csv").write_text("Name,Cardiomegaly\nx,1\n")
    assert probe.main(["--data_dir", str(tmp_path)]) == 2
    assert "train_predicted_labels.csv: no column VolumeName" in capsys.readouterr().err


def test_regional_histograms_match_numpy_per_octant():
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(3, 1, 5, 7, 6), dtype=np.uint8))
    got = probe.regional_histograms(x, bins=16, chunk=2)  # chunks of 2: the last one holds a single volume
    assert got.shape == (3, 8 * 16)
    for i in range(3):
        v = x[i, 0].numpy()
        cells = [v[a, b, c] for a in (slice(0, 2), slice(2, 5)) for b in (slice(0, 3), slice(3, 7))
                 for c in (slice(0, 3), slice(3, 6))]
        want = [np.histogram(cell, bins=16, range=(0, 256))[0] / cell.size for cell in cells]
        np.testing.assert_allclose(got[i], np.log1p(1000.0 * np.concatenate(want)))


def test_regional_granulometry_averages_the_slice_shares_per_octant():
    """The probe's `hist_gran` features: per octant, the share of pixels that the grey openings (3x3, 5x5, 7x7
    squares, scipy.ndimage here) remove by more than each threshold, over the octant's slices."""
    import torch
    from scipy import ndimage as ndi

    from ctclip.models.morphology import RESIDUE_THRESHOLDS

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.choice([10, 30, 128, 140, 250], size=(3, 1, 4, 8, 8)).astype(np.uint8))
    got = probe.regional_granulometry(x, chunk=2)
    assert got.shape == (3, 2 * 3 * len(RESIDUE_THRESHOLDS) * 4)
    for i in range(3):
        v = x[i, 0].numpy().astype(np.int32)
        layers = [v] + [ndi.grey_opening(v, size=(1, k, k), mode="nearest") for k in (3, 5, 7)]
        want = []
        for half in (slice(0, 2), slice(2, 4)):
            for upper, lower in zip(layers[:-1], layers[1:]):
                residue = (upper - lower)[half]
                for t in RESIDUE_THRESHOLDS:
                    above = residue > round(t * 127.5)
                    want += [above[:, r:r + 4, c:c + 4].mean() for r in (0, 4) for c in (0, 4)]
        np.testing.assert_allclose(got[i], np.log1p(1000.0 * np.array(want)), rtol=1e-5)

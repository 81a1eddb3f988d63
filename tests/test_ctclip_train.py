"""Training the tiny 3D CLIP on the synthetic chest set: loss falls, resume is exact, DDP and
accumulation do not change the result, the feature cache gives the same loss, bad inputs stop early."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ctclip.models.factory import configs_dir
from scripts.ctclip_preprocess import main as preprocess_main
from scripts.ctclip_train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chest(synthetic_chest):
    return synthetic_chest


def _args(chest: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"), "--ct_filepath", str(chest / "train.h5"),
            "--txt_filepath", str(chest / "train_reports.csv"), "--output_dir", str(out), "--device", "cpu",
            "--log_interval", "1", *extra]


def _losses(out: Path) -> dict[int, float]:
    recs = []
    for line in (out / "train_log.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def test_loss_falls_and_run_is_logged(chest, tmp_path):
    out = tmp_path / "run"
    assert train_main(_args(chest, out, "--max_steps", "40", "--do_validate", "--valid_interval", "20",
                            "--val_ct_filepath", str(chest / "valid.h5"),
                            "--val_label_path", str(chest / "valid_predicted_labels.csv"))) == 0
    losses = list(_losses(out).values())
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_rec = next(r for r in recs if r["kind"] == "train")
    assert {"step", "epoch", "loss", "lr", "temperature", "volumes_per_s", "max_memory_mb"} <= set(train_rec)
    valid = [r for r in recs if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [20, 40] and 0 <= valid[-1]["mean_auroc"] <= 1
    assert (out / "latest.pt").is_file() and (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    assert any((out / "tensorboard").iterdir())


def test_resume_mid_epoch_is_exact(chest, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_main(_args(chest, full, "--max_steps", "12")) == 0
    assert train_main(_args(chest, part, "--max_steps", "12", "--stop_at_step", "5")) == 0  # mid-epoch
    assert max(_losses(part)) == 5
    assert train_main(_args(chest, part, "--max_steps", "12", "--resume", "latest")) == 0
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_accumulation_keeps_the_global_batch(chest, tmp_path):
    one, acc = tmp_path / "one", tmp_path / "acc"
    assert train_main(_args(chest, one, "--max_steps", "4")) == 0
    assert train_main(_args(chest, acc, "--max_steps", "4", "--grad_accum", "2")) == 0
    a, b = _losses(one), _losses(acc)
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_feature_cache_gives_the_same_loss(chest, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train_main(_args(chest, plain, "--max_steps", "4", "--freeze_dinov2")) == 0
    assert train_main(_args(chest, cached, "--max_steps", "4", "--freeze_dinov2", "--cache_features")) == 0
    a, b = _losses(plain), _losses(cached)
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert list((chest / "train.h5.features").iterdir())  # the cache sits next to the store


def test_bf16_autocast_on_cpu(chest, tmp_path):
    out = tmp_path / "bf16"
    assert train_main(_args(chest, out, "--max_steps", "2", "--precision", "bf16")) == 0
    assert all(v == v for v in _losses(out).values())  # finite, not NaN


def test_bad_inputs_stop_before_training(chest, tmp_path, caplog):
    reports = pd.read_csv(chest / "train_reports.csv")
    empty = reports.assign(Findings_EN="Not given.", Impressions_EN=float("nan"))
    empty.to_csv(tmp_path / "empty.csv", index=False)
    args = _args(chest, tmp_path / "r", "--max_steps", "2")
    args[args.index("--txt_filepath") + 1] = str(tmp_path / "empty.csv")
    assert train_main(args) == 2 and "is empty" in caplog.text
    # a checkpoint of another architecture
    assert train_main(_args(chest, tmp_path / "a", "--max_steps", "1")) == 0
    other = configs_dir().joinpath("tiny.yaml")
    wider = tmp_path / "wider.yaml"
    wider.write_text(other.read_text().replace("embed_dim: 64", "embed_dim: 32"))
    assert train_main(_args(chest, tmp_path / "b", "--max_steps", "1", "--model_config", str(wider),
                            "--resume", str(tmp_path / "a" / "latest.pt"))) == 2
    assert "another architecture" in caplog.text and "embed_dim" in caplog.text
    # a store of another shape than the checkpoint was trained on
    assert preprocess_main(["--ct_data_path", str(chest / "volumes" / "train"), "--ct_out_path",
                            str(tmp_path / "small.h5"), "--target_shape", "8", "32", "32", "--num_workers", "0"]) == 0
    args = _args(chest, tmp_path / "c", "--max_steps", "2", "--resume", str(tmp_path / "a" / "latest.pt"))
    args[args.index("--ct_filepath") + 1] = str(tmp_path / "small.h5")
    assert train_main(args) == 2 and "trained on [16, 48, 48]" in caplog.text
    assert train_main(_args(chest, tmp_path / "d", "--cache_features")) == 2  # cache needs a frozen backbone
    assert train_main(_args(chest, tmp_path / "d", "--freeze_dinov2", "--cache_features", "--volume_shift", "2")) == 2
    assert "--volume_shift moves the volumes, --cache_features encodes each volume once" in caplog.text
    assert train_main(_args(chest, tmp_path / "e", "--do_validate")) == 2


def test_a_store_of_another_layout_is_refused(chest, radiological_valid, tmp_path, caplog):
    """Mirrored anatomy is never mixed silently: not on resume, not as the validation store."""
    assert train_main(_args(chest, tmp_path / "a", "--max_steps", "1")) == 0
    ckpt = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)
    assert ckpt["store_layout"] == "SPR"  # recorded: the seed's layout, slices bottom to top
    args = _args(chest, tmp_path / "b", "--max_steps", "2", "--resume", str(tmp_path / "a" / "latest.pt"))
    args[args.index("--ct_filepath") + 1] = str(radiological_valid)
    args[args.index("--txt_filepath") + 1] = str(chest / "validation_reports.csv")
    assert train_main(args) == 2
    assert "SPL (D inferior->superior, H anterior->posterior, W patient right->left)" in caplog.text
    assert "was trained on SPR" in caplog.text and "mirrored" in caplog.text
    caplog.clear()
    assert train_main(_args(chest, tmp_path / "c", "--max_steps", "1", "--do_validate", "--val_ct_filepath",
                            str(radiological_valid), "--val_label_path",
                            str(chest / "valid_predicted_labels.csv"))) == 2
    assert "trains on SPR" in caplog.text and "--layout radiological" not in caplog.text
    assert "the default --layout seed" in caplog.text
    assert not (tmp_path / "c" / "latest.pt").exists()


@pytest.mark.ddp
def test_torchrun_two_processes_matches_one(chest, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main(_args(chest, one, "--max_steps", "3")) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "ctclip_train.py"), "--use_ddp", *_args(chest, two, "--max_steps", "3")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in two.glob("*.pt")) == ["latest.pt"]  # one checkpoint, written once
    assert res.stdout.count("train: {") == 1  # one summary line, from rank 0
    a, b = _losses(one), _losses(two)
    assert sorted(b) == [1, 2, 3]  # rank 0 logs, once per step
    for step in a:  # same global batches, same result for any number of processes
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


@pytest.mark.ddp
def test_torchrun_with_the_text_view_and_sentence_terms(chest, tmp_path):
    """Both extra terms under DDP (tiny_cnn): the second text view is encoded inside DDP's forward and the sentence
    term reads this rank's volumes; two processes train, log once per step and write one checkpoint."""
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "ctclip_train.py"), "--use_ddp",
           *_args(chest, two, "--max_steps", "3", "--model_config", "tiny_cnn", "--sentence_keep", "0.6",
                  "--text_view_weight", "1.0", "--sentence_weight", "1.0")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in two.glob("*.pt")) == ["latest.pt"]
    losses = _losses(two)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())


@pytest.mark.slow  # ~30 s; the resume itself: test_resume_mid_epoch_is_exact and test_preemption.py
def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(chest, tmp_path):
    """A real kill: the run dies between checkpoints; resuming from latest.pt redoes the lost steps
    with the same data and reaches the same losses as an uninterrupted run."""
    import signal
    import time

    import torch

    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # same threads in every run

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "scripts" / "ctclip_train.py"), *_args(chest, out, "--max_steps", "12", *extra)]

    subprocess.run(cmd(full), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cmd(killed, "--save_interval", "3"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ckpt = killed / "latest.pt"
        if ckpt.is_file():
            try:
                step = torch.load(ckpt, weights_only=True)["step"]
            except Exception:  # noqa: BLE001 - being replaced right now
                step = 0
            if step >= 3:
                time.sleep(0.5)  # die somewhere after the checkpoint, mid-epoch
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "latest.pt", weights_only=True)["step"]
    assert 3 <= done < 12, "the run was not interrupted between checkpoints"
    subprocess.run(cmd(killed, "--resume", "latest"), env=env, check=True, capture_output=True)
    a, b = _losses(full), _losses(killed)  # the last record of each step (redone steps overwrite)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_text_view_term_changes_the_updates_not_the_logged_clip_loss(chest, tmp_path, caplog):
    """--text_view_weight adds a text-to-text contrastive term: the first step's logged loss (the CLIP term alone,
    same weights and batch; the tiny model does not centre its embeddings on the batch, where both views would
    be centred together) is unchanged, the updates differ from then on; bad settings stop before training."""
    plain, views = tmp_path / "plain", tmp_path / "views"
    assert train_main(_args(chest, plain, "--max_steps", "4", "--sentence_keep", "0.6")) == 0
    assert train_main(_args(chest, views, "--max_steps", "4", "--sentence_keep", "0.6", "--text_view_weight", "1.0")) == 0
    a, b = _losses(plain), _losses(views)
    assert a[1] == pytest.approx(b[1], abs=1e-6)
    assert any(abs(a[k] - b[k]) > 1e-4 for k in (2, 3, 4))
    assert train_main(_args(chest, tmp_path / "x", "--max_steps", "1", "--text_view_weight", "-1")) == 2
    assert train_main(_args(chest, tmp_path / "y", "--max_steps", "1", "--text_view_weight", "1",
                            "--grad_accum", "2")) == 2
    assert "--text_view_weight needs --grad_accum 1" in caplog.text


def test_sentence_term_changes_the_updates_not_the_logged_clip_loss(chest, tmp_path, caplog):
    """--sentence_weight adds the sentence-image term: the first step's logged loss (the CLIP term alone, same weights
    and batch) is unchanged, the updates differ from then on; bad settings stop before training."""
    plain, sent = tmp_path / "plain", tmp_path / "sent"
    cnn = ("--model_config", "tiny_cnn", "--sentence_keep", "0.6")
    assert train_main(_args(chest, plain, "--max_steps", "3", *cnn)) == 0
    assert train_main(_args(chest, sent, "--max_steps", "3", *cnn, "--sentence_weight", "1.0")) == 0
    # --sentence_match_cos: close wordings count as targets too, so the updates differ again
    assert train_main(_args(chest, tmp_path / "match", "--max_steps", "3", *cnn, "--sentence_weight", "1.0",
                            "--sentence_match_cos", "0.3")) == 0
    a, b, c = _losses(plain), _losses(sent), _losses(tmp_path / "match")
    assert a[1] == pytest.approx(b[1], abs=1e-6) and b[1] == pytest.approx(c[1], abs=1e-6)
    assert any(abs(a[k] - b[k]) > 1e-4 for k in (2, 3))
    assert any(abs(b[k] - c[k]) > 1e-4 for k in (2, 3))
    caplog.clear()  # shaping a term that is off is not an error (a config may set it), but it is said
    assert train_main(_args(chest, tmp_path / "off", "--max_steps", "1", *cnn, "--sentence_match_cos", "0.7")) == 0
    assert "shapes the sentence term, which is off" in caplog.text
    assert train_main(_args(chest, tmp_path / "w", "--max_steps", "1", *cnn, "--sentence_weight", "1",
                            "--sentence_match_cos", "1.5")) == 2
    assert "--sentence_match_cos must be in [0, 1]" in caplog.text
    assert train_main(_args(chest, tmp_path / "x", "--max_steps", "1", *cnn, "--sentence_weight", "-1")) == 2
    assert train_main(_args(chest, tmp_path / "y", "--max_steps", "1", *cnn, "--sentence_weight", "1",
                            "--grad_accum", "2")) == 2
    assert "--sentence_weight needs --grad_accum 1" in caplog.text
    assert train_main(_args(chest, tmp_path / "z", "--max_steps", "1", "--sentence_weight", "1")) == 2  # tiny: eot
    assert "--sentence_weight needs a model with text_pool 'sentence'" in caplog.text


def test_slice_subsets_are_evenly_spaced_draws_of_the_step():
    import torch

    from ctclip.run.train_step import SliceSubset

    sub = SliceSubset(0.5, seed=3)
    halves = {tuple(sub.indices(32, k).tolist()) for k in range(20)}
    assert halves == {tuple(range(0, 32, 2)), tuple(range(1, 32, 2))}  # every other slice, from either start
    first = sub.indices(32, 7)
    assert torch.equal(first, SliceSubset(0.5, seed=3).indices(32, 7))  # (seed, rank, step): a resume draws the same
    assert any(not torch.equal(sub.indices(32, k), SliceSubset(0.5, seed=3, rank=1).indices(32, k)) for k in range(20))
    for depth, keep in ((32, 0.375), (32, 0.25), (7, 0.9), (7, 0.3), (160, 0.5), (33, 0.5)):
        count = max(1, round(depth * keep))
        window = math.ceil(depth / count)  # any run of this many consecutive slices holds a kept one
        for step in range(30):
            idx = SliceSubset(keep, seed=1).indices(depth, step).tolist()
            assert len(idx) == count and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < depth
            assert idx[0] < window and depth - 1 - idx[-1] < window and max(b - a for a, b in zip(idx, idx[1:])) <= window
    assert SliceSubset(1.0, seed=3).indices(32, 7) is None and len(SliceSubset(0.01, seed=3).indices(32, 0)) == 1
    volumes = torch.arange(2 * 32 * 4, dtype=torch.uint8).reshape(2, 1, 32, 2, 2)
    feats = torch.randn(2, 32, 5)  # cached slice features (B, D, C)
    assert SliceSubset.axis(volumes) == 2 and SliceSubset.axis(feats) == 1
    cut = SliceSubset.select(volumes, first)
    assert cut.shape == (2, 1, 16, 2, 2) and torch.equal(cut, volumes[:, :, first])
    assert torch.equal(SliceSubset.select(feats, first), feats[:, first])
    with pytest.raises(ValueError, match="slice keep"):
        SliceSubset(0.0, seed=0)


def test_slice_keep_trains_on_a_subset_of_the_slices(chest, tmp_path, caplog):
    """--slice_keep: the steps see other inputs, so the logged losses differ from the first step on; a bad value
    stops before training."""
    cnn = ("--model_config", "tiny_cnn", "--sentence_keep", "0.6")
    assert train_main(_args(chest, tmp_path / "all", "--max_steps", "2", *cnn)) == 0
    assert train_main(_args(chest, tmp_path / "half", "--max_steps", "2", *cnn, "--slice_keep", "0.5")) == 0
    a, b = _losses(tmp_path / "all"), _losses(tmp_path / "half")
    assert abs(a[1] - b[1]) > 1e-5
    assert train_main(_args(chest, tmp_path / "bad", "--max_steps", "1", *cnn, "--slice_keep", "1.5")) == 2
    assert "--slice_keep must be in (0, 1]" in caplog.text


def test_text_views_keep_a_subset_of_each_reports_sentences():
    from ctclip.data.reports import split_sentences
    from ctclip.run.train_step import TextView

    texts = ["Heart size is normal. No pleural effusion. A 4.5 mm nodule in the right upper lobe. Emphysema.",
             "Not given."]
    first, again = TextView(1.0, 0.5, seed=3).views(texts, 7), TextView(1.0, 0.5, seed=3).views(texts, 7)
    assert first == again  # drawn from (seed, rank, step): a resumed run draws the same views
    assert any(TextView(1.0, 0.5, seed=3).views(texts, k) != first for k in range(8, 20))
    for text, view in zip(texts, first, strict=True):
        kept = split_sentences(view)
        assert kept and set(kept) <= set(split_sentences(text))
    assert TextView(1.0, 1.0, seed=3).views(texts, 0) == texts

"""The CUDA paths of both pipelines against their CPU results (marker `gpu`: skipped without a CUDA device).

The CPU suite never runs these lines: autocast on CUDA, channels_last on the device, uint8 batches moved to
the GPU and normalised there, and the training step under bf16. Each test runs the same script on the CPU
in fp32 and on the GPU, and compares what it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hemorrhage.classes import CLASSES
from hemorrhage.models import SEED_ENSEMBLE
from hemorrhage.models.checkpoint import save_random_weights
from scripts.ctclip_eval import main as eval_main
from scripts.ctclip_train import main as train_main
from scripts.hemorrhage_infer import main as infer_main
from tests.test_ctclip_train import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")]


def _per_slice(pred: Path) -> pd.DataFrame:
    df = pd.read_csv(pred.with_name(pred.stem + "_per_slice.csv"), dtype={"SOPInstanceUID": str})
    return df.set_index("SOPInstanceUID").sort_index()


def test_hemorrhage_ensemble_on_cuda_matches_the_cpu(synthetic_head, tmp_path):
    """The three published architectures (random weights in the original layout): the GPU in fp32 gives the
    CPU's probabilities; bf16 autocast + channels_last (the GPU default) stays within bf16's rounding."""
    weights = tmp_path / "weights"
    save_random_weights(weights, SEED_ENSEMBLE, folds=(0,), seed=1)
    common = ["--data_dir", str(synthetic_head / "dicom"), "--weights_dir", str(weights), "--input_size", "128",
              "--batch_size", "16", "--num_workers", "2", "--no_progress"]
    runs = {}
    for name, extra in {"cpu": ["--device", "cpu"], "cuda_fp32": ["--device", "cuda", "--amp", "none"],
                        "cuda_bf16": ["--device", "cuda"]}.items():
        pred = tmp_path / name / "predictions.csv"
        assert infer_main([*common, *extra, "--output", str(pred)]) == 3  # the fixture's two broken files
        runs[name] = _per_slice(pred)
    record = json.loads((tmp_path / "cuda_bf16" / "predictions_run.json").read_text())
    assert record["device"]["type"] == "cuda" and record["device"]["amp"] == "bfloat16"
    cpu = runs["cpu"][list(CLASSES)].to_numpy()
    assert len(cpu) > 0
    for name, atol in (("cuda_fp32", 2e-3), ("cuda_bf16", 3e-2)):
        other = runs[name]
        assert list(other.index) == list(runs["cpu"].index)
        np.testing.assert_allclose(other[list(CLASSES)].to_numpy(), cpu, atol=atol, err_msg=name)


def test_ctclip_trains_in_bf16_on_cuda_and_evaluates_as_on_the_cpu(synthetic_chest, tmp_path):
    """The tiny 3D CLIP: 20 steps under bf16 autocast on the GPU (loss finite and falling), then zero-shot
    evaluation of that checkpoint on the GPU in fp32 and on the CPU give the same scores."""
    out = tmp_path / "run"
    assert train_main(["--config", str(ROOT / "configs" / "ctclip" / "train_tiny.yaml"),
                       "--ct_filepath", str(synthetic_chest / "train.h5"),
                       "--txt_filepath", str(synthetic_chest / "train_reports.csv"), "--output_dir", str(out),
                       "--device", "cuda", "--precision", "bf16", "--max_steps", "20", "--log_interval", "1"]) == 0
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    scores = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        ev = tmp_path / f"eval_{device}_{precision}"
        assert eval_main(["--model_path", str(out / "latest.pt"), "--test_data", str(synthetic_chest / "train.h5"),
                          "--test_labels", str(synthetic_chest / "train_predicted_labels.csv"),
                          "--output_dir", str(ev), "--device", device, "--precision", precision,
                          "--num_workers", "0", "--n_bootstrap", "0"]) == 0
        scores[(device, precision)] = pd.read_csv(ev / "logits.csv").set_index("VolumeName").sort_index()
    ref = scores[("cpu", "fp32")]
    np.testing.assert_allclose(scores[("cuda", "fp32")].to_numpy(), ref.to_numpy(), atol=1e-3)
    np.testing.assert_allclose(scores[("cuda", "bf16")].to_numpy(), ref.to_numpy(), atol=0.1)


def test_dinov2_vitb_trains_a_step_in_bf16():
    """The real-run architecture (DINOv2 ViT-B/14 slices, random init) on small volumes: one optimizer step of
    the training step module under bf16 autocast on the GPU changes the slice encoder, all of it finite."""
    from ctclip.losses import ClipLoss
    from ctclip.models.clip3d import param_groups
    from ctclip.models.factory import create_model
    from ctclip.run.train import TrainingStep

    torch.manual_seed(0)
    model = create_model("dinov2_vitb14", freeze_dinov2=False, image_size=112).cuda()
    step_module = TrainingStep(model, from_slices=False)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    volumes = torch.randint(0, 256, (2, 1, 8, 112, 112), dtype=torch.uint8, device="cuda")
    tokens = model.tokenize(["Bilateral pleural effusion.", "No pleural effusion."]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        v, t, scale = step_module(volumes, tokens)
        loss = ClipLoss()(v.float(), t.float(), scale.float())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    changed = {n for n, before in trainable.items() if not torch.equal(params[n], before)}
    assert any("slice" in n for n in changed), sorted(changed)[:5]
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""The RSNA 2019 CNNs (key layout of the published files, forward parity with timm/torchvision), the
original checkpoint format, the weights-folder check and the sequence head (padding never leaks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hemorrhage.classes import CLASS_WEIGHTS, N_CLASSES
from hemorrhage.models import (
    CheckpointError,
    SequenceConfig,
    SequenceModel,
    build_cnn,
    check_weights,
    cnn_spec,
    find_weights,
    list_cnns,
    load_original_checkpoint,
    masked_weighted_bce,
    normalize_uint8,
    pad_features,
    pad_studies,
    parse_weights_folder,
    predict_both_directions,
    read_original_checkpoint,
    reverse_slices,
    save_original_checkpoint,
    sequence_loss,
)
from hemorrhage.models.sequence import MaskedBatchNorm2d

KEY_COUNTS = {"se_resnext101_32x4d": 758, "DenseNet121_change_avg": 727, "DenseNet169_change_avg": 1015}
PREFIX = {"se_resnext101_32x4d": "model_ft.", "DenseNet121_change_avg": "densenet121.",
          "DenseNet169_change_avg": "densenet169."}


@pytest.fixture(scope="module")
def cnns() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_cnn(name).eval() for name in KEY_COUNTS}


@pytest.fixture(scope="module")
def original_files(cnns, tmp_path_factory) -> dict[str, Path]:
    """Each model saved exactly as the original train.py did: from a DataParallel wrapper (CPU here)."""
    d = tmp_path_factory.mktemp("original")
    files = {}
    for name, model in cnns.items():
        wrapped = nn.DataParallel(model)
        files[name] = d / f"{name}.pth"
        torch.save({"epoch": 40, "state_dict": wrapped.state_dict(), "valLoss": 0.0712}, files[name])
        model.cpu()  # with a GPU present, DataParallel moved it there (and the file holds CUDA tensors)
    return files


# ---------------------------------------------------------------------------------------------------------
# architectures


def test_registry_names_and_errors():
    assert list_cnns() == ["se_resnext101_32x4d", "DenseNet169_change_avg", "DenseNet121_change_avg"]
    assert "tiny_densenet" in list_cnns(include_test_only=True)
    with pytest.raises(ValueError, match="unknown CNN 'resnet50'"):
        build_cnn("resnet50")


@pytest.mark.parametrize("name", list(KEY_COUNTS))
def test_state_dict_layout(cnns, name):
    state = cnns[name].state_dict()
    assert len(state) == KEY_COUNTS[name]
    assert all(k.startswith(PREFIX[name]) or k.startswith("mlp.") for k in state)
    head = "model_ft.last_linear.0" if name.startswith("se_") else "mlp"
    dim = cnn_spec(name).feature_dim
    assert state[f"{head}.weight"].shape == (N_CLASSES, dim) and state[f"{head}.bias"].shape == (N_CLASSES,)
    assert cnns[name].feature_dim == dim


def test_se_resnext_matches_cadene_layout(cnns):
    model = cnns["se_resnext101_32x4d"]
    keys = list(model.state_dict())
    assert keys[:3] == ["model_ft.layer0.conv1.weight", "model_ft.layer0.bn1.weight", "model_ft.layer0.bn1.bias"]
    assert keys[-2:] == ["model_ft.last_linear.0.weight", "model_ft.last_linear.0.bias"]
    assert isinstance(model.model_ft.avg_pool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.model_ft.last_linear, nn.Sequential) and len(model.model_ft.last_linear) == 1
    assert not any(isinstance(m, nn.Dropout) for m in model.modules()) and model.model_ft.drop_rate == 0


@pytest.mark.parametrize("name", list(KEY_COUNTS))
def test_forward_features_and_logits(cnns, name):
    model = cnns[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits, features = model(x, return_features=True)
        assert logits.shape == (2, N_CLASSES) and features.shape == (2, model.feature_dim)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.classify(model.forward_features(x)), logits)


def test_se_resnext_forward_equals_timm_reference(cnns):
    """Our wrapper = timm's own forward of legacy_seresnext101_32x4d with the same weights (no dropout)."""
    ours = cnns["se_resnext101_32x4d"]
    ref = timm.create_model("legacy_seresnext101_32x4d", pretrained=False, num_classes=N_CLASSES).eval()
    ref.load_state_dict({k.removeprefix("model_ft.").replace("last_linear.0.", "last_linear."): v
                         for k, v in ours.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,depth", [("DenseNet121_change_avg", 121), ("DenseNet169_change_avg", 169)])
def test_densenet_forward_equals_torchvision(cnns, name, depth):
    """torchvision's DenseNet.forward is features -> relu -> avg pool -> classifier: the original's order."""
    ours = cnns[name]
    ref = getattr(torchvision.models, f"densenet{depth}")(weights=None, num_classes=N_CLASSES).eval()
    ref.features.load_state_dict(getattr(ours, f"densenet{depth}").state_dict())
    ref.classifier.load_state_dict(ours.mlp.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


def test_normalize_uint8():
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # HWC batch, channels-last
    y = normalize_uint8(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, (x.double() / 255 - 0.456) / 0.224, check_dtype=False, rtol=0, atol=2e-6)
    assert normalize_uint8(x, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(x.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normalize_uint8(x[:, :1])


def test_channels_last_model():
    model = build_cnn("tiny_densenet").eval()
    x = normalize_uint8(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.inference_mode():
        ref = model(x)
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("name", list(KEY_COUNTS))
def test_original_file_loads_strictly(cnns, original_files, name):
    ckpt = read_original_checkpoint(original_files[name])
    assert (ckpt.epoch, ckpt.val_loss) == (40, 0.0712)
    assert len(ckpt.state_dict) == KEY_COUNTS[name]
    src = cnns[name].state_dict()
    assert {k: v.shape for k, v in ckpt.state_dict.items()} == {k: v.shape for k, v in src.items()}
    torch.manual_seed(123)  # a fresh model with other random weights
    fresh = build_cnn(name)
    load_original_checkpoint(fresh, original_files[name])
    assert all(torch.equal(v, src[k]) for k, v in fresh.state_dict().items())


def test_save_original_checkpoint_writes_what_the_original_wrote(cnns, tmp_path):
    model = cnns["DenseNet121_change_avg"]
    wrapped = nn.DataParallel(model)
    path = save_original_checkpoint(wrapped, tmp_path / "model_epoch_best_0.pth", epoch=7, val_loss=0.081)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "state_dict", "valLoss"}
    assert type(raw["epoch"]) is int and type(raw["valLoss"]) is float
    reference = wrapped.state_dict()
    assert list(raw["state_dict"]) == list(reference)  # every key "module.", original order
    assert raw["state_dict"]._metadata == reference._metadata  # module versions (BatchNorm's) kept
    assert all(torch.equal(raw["state_dict"][k], v.cpu()) for k, v in reference.items())
    model.cpu()
    # the plain model gives the same file; rewriting replaces it and leaves no temporary behind
    save_original_checkpoint(model, path, epoch=8, val_loss=0.07)
    assert read_original_checkpoint(path).epoch == 8
    assert os.listdir(tmp_path) == ["model_epoch_best_0.pth"]


def test_mismatched_file_names_the_problems(original_files):
    model = build_cnn("DenseNet121_change_avg")
    with pytest.raises(CheckpointError) as info:
        load_original_checkpoint(model, original_files["DenseNet169_change_avg"])
    msg = str(info.value)
    assert str(original_files["DenseNet169_change_avg"]) in msg and "does not fit DenseNet121_change_avg" in msg
    assert "missing keys 725: densenet121.conv0.weight" in msg and "(+720 more)" in msg
    assert "unexpected keys 1013: densenet169.conv0.weight" in msg
    assert "shape mismatches 1: mlp.weight file (6, 1664) vs model (6, 1024)" in msg
    assert "the file holds a DenseNet169_change_avg checkpoint" in msg


def test_files_that_are_not_checkpoints(tmp_path):
    model = build_cnn("tiny_densenet")
    (tmp_path / "noise.pth").write_bytes(os.urandom(1000))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"epoch": 3, "valLoss": 0.1}, tmp_path / "no_state.pth")
    torch.save(model, tmp_path / "pickled_module.pth")  # weights_only refuses arbitrary classes
    for name, pattern in [("noise.pth", "not a readable PyTorch checkpoint"), ("list.pth", "found a list"),
                          ("no_state.pth", "keys \\['epoch', 'valLoss'\\]"),
                          ("pickled_module.pth", "not a readable PyTorch checkpoint")]:
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_original_checkpoint(model, tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_original_checkpoint(model, tmp_path / "missing.pth")


def test_legacy_formats_load(tmp_path):
    """2019-era files: the pre-1.6 tar serialisation, torchvision < 0.3 DenseNet names, no DataParallel."""
    torch.manual_seed(1)
    src = build_cnn("tiny_densenet")
    state = src.state_dict()
    old_names = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
    assert old_names.keys() != state.keys()
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in old_names.items()}, "valLoss": 0.5},
               tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    torch.save(state, tmp_path / "bare.pth")
    for name in ("old.pth", "bare.pth"):
        dst = build_cnn("tiny_densenet")
        load_original_checkpoint(nn.DataParallel(dst), tmp_path / name)
        assert all(torch.equal(v.cpu(), state[k]) for k, v in dst.state_dict().items())


# ---------------------------------------------------------------------------------------------------------
# the weights folder


def test_parse_weights_folder():
    assert parse_weights_folder("DenseNet121_change_avg_512") == ("DenseNet121_change_avg", 512)
    assert parse_weights_folder("se_resnext101_32x4d_256") == ("se_resnext101_32x4d", 256)
    for bad in ("DenseNet121_change_avg", "resnet50_256", "notes"):
        with pytest.raises(ValueError):
            parse_weights_folder(bad)


def _layout(root: Path, members: dict[str, dict[int, Path]]) -> None:
    for folder, files in members.items():
        (root / folder).mkdir(parents=True)
        for fold, src in files.items():
            os.link(src, root / folder / f"model_epoch_best_{fold}.pth")  # no copying of large files


def test_weights_folder_sound(original_files, tmp_path):
    d121, d169 = original_files["DenseNet121_change_avg"], original_files["DenseNet169_change_avg"]
    _layout(tmp_path, {"DenseNet169_change_avg_256": dict.fromkeys(range(5), d169),
                       "DenseNet121_change_avg_512": dict.fromkeys(range(5), d121)})
    (tmp_path / "notes").mkdir()
    inv = check_weights(tmp_path)
    assert inv.problems == []
    assert [(m.name, m.image_size, m.folds) for m in inv.models] == [
        ("DenseNet121_change_avg", 512, [0, 1, 2, 3, 4]), ("DenseNet169_change_avg", 256, [0, 1, 2, 3, 4])]
    assert any("left out se_resnext101_32x4d (256 px)" in m for m in inv.messages)
    assert any(m.startswith("ignored notes/") for m in inv.messages)
    rows = inv.records()
    assert len(rows) == 10 and len({r["sha256"] for r in rows}) == 2 and len(rows[0]["sha256"]) == 64
    inv.raise_if_problems()


def test_weights_folder_reports_every_problem_at_once(original_files, tmp_path):
    d121, d169 = original_files["DenseNet121_change_avg"], original_files["DenseNet169_change_avg"]
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(256))
    root = tmp_path / "weights"
    _layout(root, {"DenseNet121_change_avg_512": {0: d121, 1: d121, 2: noise, 4: d169}})
    expected = {"DenseNet121_change_avg_512/model_epoch_best_1.pth": "0" * 64}
    inv = check_weights(root, expected_sha256=expected)
    text = "\n".join(inv.problems)
    assert len(inv.problems) == 4, text
    assert "missing " + str(root / "DenseNet121_change_avg_512" / "model_epoch_best_3.pth") in text
    assert "model_epoch_best_1.pth: sha256" in text and "differs from the expected 0000" in text
    assert "model_epoch_best_2.pth is not a readable PyTorch checkpoint" in text
    assert "model_epoch_best_4.pth does not fit DenseNet121_change_avg" in text
    with pytest.raises(CheckpointError, match="4 problem"):
        inv.raise_if_problems()
    # without content checks nothing is opened: only the missing fold remains
    assert len(find_weights(root, hash_files=False).problems) == 1
    assert find_weights(root, hash_files=False, require_all_folds=False).problems == []
    assert find_weights(tmp_path / "absent").problems == [f"weights folder not found: {tmp_path / 'absent'}"]


# ---------------------------------------------------------------------------------------------------------
# sequence head

M, FEAT = 3, 2048


def _study(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = pad_features([torch.randn(t, d, generator=g) for d in (2048, 1664, 1024)])
    probs = torch.rand(t, M, N_CLASSES, generator=g)
    targets = (torch.rand(t, N_CLASSES, generator=g) > 0.7).float()
    return features, probs, targets


def _batch(lengths: list[int], pad_to: int, garbage: float = 0.0):
    studies = [_study(t, seed=i) for i, t in enumerate(lengths)]
    out = []
    for part in zip(*studies):
        batch, mask = pad_studies(list(part))
        extra = pad_to - batch.shape[1]
        batch = torch.cat([batch, torch.zeros(batch.shape[0], extra, *batch.shape[2:])], 1)
        batch[~torch.cat([mask, torch.zeros(len(lengths), extra, dtype=torch.bool)], 1)] = garbage
        out.append(batch)
    mask = torch.arange(pad_to) < torch.tensor(lengths)[:, None]
    return (*out, mask)


def test_pad_helpers():
    f = pad_features([torch.ones(4, 1024), torch.ones(4, 2048)])
    assert f.shape == (4, 2, 2048) and f[:, 0, 1024:].abs().sum() == 0 and f[:, 0, :1024].eq(1).all()
    with pytest.raises(ValueError, match="d <= 2048"):
        pad_features([torch.ones(4, 4096)])
    batch, mask = pad_studies([torch.ones(2, 3), torch.ones(4, 3)])
    assert batch.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]


def test_sequence_config_validation():
    with pytest.raises(ValueError, match="rnn must be one of"):
        SequenceConfig(rnn="transformer")
    with pytest.raises(ValueError, match="hidden"):
        SequenceConfig(hidden=0)
    model = SequenceModel(SequenceConfig(rnn="gru"))
    assert isinstance(model.feat_rnn, nn.GRU) and model.feat_rnn.hidden_size == 96
    assert model.feat_rnn.num_layers == 2 and model.feat_rnn.bidirectional
    assert isinstance(SequenceModel().prob_rnn, nn.LSTM)  # LSTM by default


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_padding_never_reaches_real_slices_eval(rnn):
    torch.manual_seed(0)
    model = SequenceModel(SequenceConfig(rnn=rnn, num_models=M)).eval()
    f8, p8, _, m8 = _batch([5, 8], pad_to=8)
    f12, p12, _, m12 = _batch([5, 8], pad_to=12, garbage=1e3)  # padding full of large values
    with torch.inference_mode():
        out8, out12 = model(f8, p8, m8), model(f12, p12, m12)
        alone = model(f8[:1, :5], p8[:1, :5])  # the short study by itself, no mask
    for a, b in zip(out8, out12):
        assert a.shape == (2, 8, N_CLASSES)
        torch.testing.assert_close(a, b[:, :8], rtol=0, atol=1e-6)
        assert b[:, 8:].abs().max() == 0 and b[0, 5:].abs().max() == 0
    torch.testing.assert_close(out8.logits[:1, :5], alone.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out8.aux_logits[:1, :5], alone.aux_logits, rtol=0, atol=1e-5)


def test_padding_never_reaches_real_slices_train():
    """Training mode too: BatchNorm statistics, dropout draws, loss and gradients ignore the padding."""
    cfg = SequenceConfig(num_models=M)
    torch.manual_seed(0)
    model = SequenceModel(cfg).train()
    results = []
    for pad_to, garbage in ((8, 0.0), (12, 50.0)):
        f, p, y, mask = _batch([5, 8], pad_to=pad_to, garbage=garbage)
        torch.manual_seed(7)
        model.zero_grad()
        out = model(f, p, mask)
        loss = sequence_loss(out, y, mask)
        loss.backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        results.append((out.logits[:, :8][mask[:, :8]].detach(), loss.detach(), grads))
    (l8, loss8, g8), (l12, loss12, g12) = results
    torch.testing.assert_close(l8, l12, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss8, loss12, rtol=1e-6, atol=1e-7)
    for k in g8:
        torch.testing.assert_close(g8[k], g12[k], rtol=1e-4, atol=1e-6)


def test_slice_gap_option():
    model = SequenceModel(SequenceConfig(num_models=M, use_slice_gap=True)).eval()
    f, p, _, mask = _batch([4, 6], pad_to=6)
    with pytest.raises(ValueError, match="slice_gap"):
        model(f, p, mask)
    with torch.inference_mode():
        assert model(f, p, mask, slice_gap=torch.full((2, 6), 5.0)).logits.shape == (2, 6, N_CLASSES)


def test_bad_inputs():
    model = SequenceModel(SequenceConfig(num_models=M)).eval()
    f, p, _, mask = _batch([4, 6], pad_to=6)
    with pytest.raises(ValueError, match="padding after"):
        model(f, p, mask.flip(1))
    with pytest.raises(ValueError, match=r"features must be \(B, T, 3, 2048\)"):
        model(f[..., :1024], p, mask)


def test_masked_batchnorm_matches_batchnorm_on_real_slices():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 3)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    ours, ref = MaskedBatchNorm2d(4).train(), nn.BatchNorm2d(4).train()
    # full mask: identical to BatchNorm2d, running statistics included
    torch.testing.assert_close(ours(x, torch.ones(2, 6, dtype=torch.bool)), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    # partial mask: BatchNorm2d over the real slices alone
    ours, ref = MaskedBatchNorm2d(4).train(), nn.BatchNorm2d(4).train()
    real = torch.cat([x[0], x[1, :, :2]], 1)[None]  # (1, C, 8 real slices, W)
    y = ours(x, mask)
    torch.testing.assert_close(torch.cat([y[0], y[1, :, :2]], 1)[None], ref(real), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_masked_batchnorm_under_autocast():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 4, 6, 3) * 30 + 100, torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    bn = MaskedBatchNorm2d(4).train()
    ref = bn(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x.bfloat16(), mask)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=0.05)


def test_reverse_slices():
    x = torch.arange(10.0).view(2, 5)
    r = reverse_slices(x, torch.tensor([3, 5]))
    assert r.tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]]
    assert torch.equal(reverse_slices(r, torch.tensor([3, 5])), x)
    assert torch.equal(reverse_slices(x), x.flip(1))


def test_predict_both_directions():
    torch.manual_seed(0)
    model = SequenceModel(SequenceConfig(num_models=M))
    f, p, _, mask = _batch([4, 7], pad_to=9, garbage=9.0)
    with pytest.raises(ValueError, match="eval"):
        predict_both_directions(model, f, p, mask)
    model.eval()
    out = predict_both_directions(model, f, p, mask)
    assert out.shape == (2, 9, N_CLASSES) and out[~mask].abs().max() == 0
    with torch.inference_mode():  # oracle: the short study alone, reversed by plain flipping
        fs, ps = f[:1, :4], p[:1, :4]
        fwd = torch.sigmoid(model(fs, ps).logits)
        bwd = torch.sigmoid(model(fs.flip(1), ps.flip(1)).logits).flip(1)
    torch.testing.assert_close(out[:1, :4], (fwd + bwd) / 2, rtol=0, atol=1e-5)


def test_masked_weighted_bce():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 6), (torch.rand(2, 5, 6) > 0.5).float()
    # the original criterion: per-class mean BCE, weights [2, 1, 1, 1, 1, 1], divided by their sum
    w = torch.tensor(CLASS_WEIGHTS)
    original = sum(F.binary_cross_entropy_with_logits(logits[..., i], targets[..., i]) * w[i]
                   for i in range(6)) / w.sum()
    torch.testing.assert_close(masked_weighted_bce(logits, targets), original)
    # padding appended with garbage (NaN targets, huge logits) changes nothing and gets no gradient
    padded_logits = torch.cat([logits, torch.full((2, 3, 6), 1e4)], 1).requires_grad_(True)
    padded_targets = torch.cat([targets, torch.full((2, 3, 6), float("nan"))], 1)
    mask = torch.arange(8) < 5
    loss = masked_weighted_bce(padded_logits, padded_targets, mask.expand(2, 8))
    torch.testing.assert_close(loss, original)
    loss.backward()
    assert padded_logits.grad[:, 5:].abs().max() == 0 and padded_logits.grad[:, :5].abs().max() > 0

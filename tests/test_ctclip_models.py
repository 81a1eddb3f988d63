"""CT-CLIP model tests on CPU: tiny model behaviour, DINOv2 official-layout loading, text weights."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import open_clip
import pytest
import timm
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from ctclip.models import (
    CTCLIP,
    ModelConfig,
    create_model,
    get_model_config,
    list_slice_encoders,
    model_config_from_yaml,
    param_groups,
)
from ctclip.models.slice_encoder import DINOV2_ARCHS, build_slice_encoder
from ctclip.models.text import build_text_tower, load_openai_text_weights, tokenize

EOT = 49407


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose a lot when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**changes) -> ModelConfig:
    return dataclasses.replace(get_model_config("tiny"), **changes)


def tiny_model(seed: int = 0, **changes) -> CTCLIP:
    torch.manual_seed(seed)
    return create_model(tiny_cfg(**changes))


def volumes(b: int = 2, d: int = 9, hw: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, d, hw, hw), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- tiny model


def test_tiny_forward_backward_shapes_and_norms():
    model = tiny_model()
    tokens = model.tokenize(["no acute findings", "bilateral pleural effusion"])
    vol, txt, scale = model(volumes(), tokens)
    assert vol.shape == txt.shape == (2, 64)
    torch.testing.assert_close(vol.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.encode_slices(volumes(d=5)).shape == (2, 5, 64)
    (scale * vol @ txt.T).logsumexp(-1).sum().backward()
    for part in (model.slice_encoder.backbone, model.fusion, model.text):
        assert all(p.grad is not None for p in part.parameters())
    assert model.logit_scale.grad is not None


def test_logit_scale_is_clamped_at_use():
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(volumes(b=1, d=2), model.tokenize(["x"]))[2].item() == pytest.approx(100.0, rel=1e-5)


def test_chunking_matches_one_chunk():
    one, chunked = tiny_model(slice_chunk=1000).eval(), tiny_model(slice_chunk=4).eval()
    chunked.load_state_dict(one.state_dict())
    vols = volumes(d=11)
    with torch.no_grad():
        torch.testing.assert_close(chunked.encode_slices(vols), one.encode_slices(vols), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked.encode_volume(vols), one.encode_volume(vols), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = tiny_model(slice_chunk=4), tiny_model(slice_chunk=4, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    vols, tokens = volumes(d=10), plain.tokenize(["a", "b"])
    for model in (plain, ckpt):
        vol, txt, scale = model(vols, tokens)
        (scale * vol @ txt.T).logsumexp(-1).sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_per_slice_normalisation_and_constant_slices():
    enc = tiny_model().slice_encoder
    vol = volumes(b=1, d=4, hw=56)
    vol[0, 0, 0] = 0
    vol[0, 0, 1] = 255
    vol[0, 0, 2] = 37
    vol[0, 0, 3] = torch.arange(56 * 56).reshape(56, 56) % 11 + 100  # values 100..110 stretched to [0, 1]
    x = enc.preprocess(vol[0].transpose(0, 1))  # (D, 1, H, W) slices, size unchanged (image_size 56)
    assert x.shape == (4, 3, 56, 56) and torch.isfinite(x).all()
    unit = x * enc.std + enc.mean
    torch.testing.assert_close(unit[:3], torch.zeros_like(unit[:3]), atol=1e-6, rtol=0)
    assert unit[3].amin().item() == pytest.approx(0, abs=1e-6) and unit[3].amax().item() == pytest.approx(1, abs=1e-6)
    assert torch.isfinite(enc(vol)).all()
    # mean/std come from the timm model's data config, not from constants here
    mean = timm.data.resolve_model_data_config(enc.backbone)["mean"]
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(mean))


def test_resize_to_image_size():
    enc = tiny_model().slice_encoder
    assert enc.preprocess(volumes(b=1, d=3, hw=90)[0].transpose(0, 1)).shape == (3, 3, 56, 56)
    assert enc(volumes(b=2, d=3, hw=30)).shape == (2, 3, 64)


@pytest.mark.parametrize("depth", [1, 7, 33])
def test_variable_slice_counts(depth):
    model = tiny_model().eval()
    with torch.no_grad():
        feats = model.encode_slices(volumes(b=2, d=depth, hw=28))
        assert feats.shape == (2, depth, 64)
        assert model.encode_volume_from_slices(feats).shape == (2, 64)


@pytest.mark.parametrize("pool", ["cls", "max"])
def test_padding_mask_matches_unpadded_volume(pool):
    model = tiny_model(fusion_pool=pool).eval()
    feats = torch.randn(1, 6, 64)
    padded = torch.cat([feats, torch.randn(1, 4, 64)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_volume_from_slices(padded, mask=mask),
                                   model.encode_volume_from_slices(feats), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "max"])
def test_a_slice_subset_at_its_positions_is_the_volume_with_the_other_slices_masked(pool):
    """--slice_keep hands the fusion the kept slices with their indices in the volume: the rotary embedding then
    sees the distances of the whole volume. Oracle: the whole volume with every other slice masked out (its
    slices keep their places, and masked slices are never attended to)."""
    model = tiny_model(fusion_pool=pool).eval()
    feats = torch.randn(2, 10, 64)
    idx = torch.tensor([1, 3, 4, 8])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, idx] = True
    with torch.no_grad():
        subset = model.encode_volume_from_slices(feats[:, idx], positions=idx)
        torch.testing.assert_close(subset, model.encode_volume_from_slices(feats, mask=mask), atol=1e-5, rtol=1e-5)
        # renumbered 0..3 the same slices are another input: the positions are used
        assert not torch.allclose(model.encode_volume_from_slices(feats[:, idx]), subset, atol=1e-4)
        # the whole volume at its own positions is the plain call
        torch.testing.assert_close(model.encode_volume_from_slices(feats, positions=torch.arange(10)),
                                   model.encode_volume_from_slices(feats))
        with pytest.raises(ValueError, match="positions of shape"):
            model.encode_volume_from_slices(feats[:, idx], positions=idx[:3])


def test_max_pool_is_the_maximum_over_the_fused_slices_and_loads_a_cls_checkpoint():
    cls_model = tiny_model(fusion_pool="cls").eval()
    max_model = tiny_model(fusion_pool="max").eval()
    max_model.load_state_dict(cls_model.state_dict())  # the same parameters: a checkpoint loads under either
    feats = torch.randn(3, 5, 64)
    with torch.no_grad():
        fused = cls_model.fusion.tokens(feats)  # (3, 1 + 5, dim): CLS first
        oracle = cls_model.fusion.proj_out(cls_model.fusion.norm(torch.stack(
            [torch.stack([fused[b, 1:, c].max() for c in range(fused.shape[-1])]) for b in range(3)])))
        torch.testing.assert_close(max_model.fusion(feats), oracle)
        torch.testing.assert_close(cls_model.fusion(feats), cls_model.fusion.head(fused[:, 0]))
        # the two pools are different volume tokens
        assert not torch.allclose(max_model.fusion(feats), cls_model.fusion(feats))
    with pytest.raises(ValueError, match="fusion_pool must be one of"):
        tiny_cfg(fusion_pool="mean")


def test_tiny_cnn_channels_last_computes_the_contiguous_network():
    from ctclip.models.tiny_cnn import TinySliceCNN

    torch.manual_seed(0)
    cnn = TinySliceCNN(image_size=32).eval()
    ref = TinySliceCNN(image_size=32, channels_last=False).eval()
    ref.load_state_dict(cnn.state_dict())
    # the 16 -> 32 convolution (the first one's single input channel is contiguous in both layouts)
    conv, ref_conv = cnn.features[3].weight, ref.features[3].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert ref_conv.is_contiguous() and not ref_conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(6, 1, 32, 32)
    with torch.no_grad():
        assert ref.features(x).is_contiguous()  # the reference really runs in the NCHW layout
        torch.testing.assert_close(cnn(x), ref(x), atol=1e-5, rtol=1e-5)


def test_tiny_cnn_benchmark_refuses_empty_settings(capsys):
    from benchmarks.bench_tiny_cnn import main

    with pytest.raises(SystemExit) as exc:
        main(["--slices", "0", "--repeats", "0"])
    assert exc.value.code == 2
    assert "(at least 1; the branches at least 0): --slices 0, --repeats 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--gran_levels", "-1"])
    assert "--gran_levels -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--memo"])
    assert "--memo needs the fixed branches" in capsys.readouterr().err


def test_tiny_cnn_benchmark_compares_the_memo_with_recomputing(tmp_path, capsys):
    """--memo: both arms compute the same features (checked before timing) and the table names both."""
    from benchmarks.bench_tiny_cnn import main

    out = tmp_path / "memo.json"
    assert main(["--slices", "32", "--image_size", "16", "--chunk", "16", "--steps", "1", "--repeats", "1",
                 "--hist_bins", "8", "--gran_levels", "1", "--in_chans", "2", "--memo", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max abs difference 0.00e+00" in text
    assert "| fixed features kept (ours) |" in text and "| recomputed (reference) |" in text
    assert set(json.loads(out.read_text())["median"]) == {"fixed features kept (ours)", "recomputed (reference)"}


def test_freeze_dinov2_leaves_backbone_without_gradients():
    model = tiny_model(freeze_dinov2=True)
    model.train()
    assert not model.slice_encoder.backbone.training and model.fusion.training
    vol, txt, scale = model(volumes(d=4), model.tokenize(["a", "b"]))
    (scale * vol @ txt.T).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.slice_encoder.backbone.parameters())
    assert all(p.grad is not None for p in model.fusion.parameters())
    grouped = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not grouped & {id(p) for p in model.slice_encoder.backbone.parameters()}


def test_bf16_autocast_forward_on_cpu():
    model = tiny_model()
    tokens = model.tokenize(["left lower lobe nodule", "normal"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vol, txt, scale = model(volumes(d=5), tokens)
        loss = (scale * vol.float() @ txt.float().T).logsumexp(-1).sum()
    loss.backward()
    assert vol.shape == txt.shape == (2, 64)
    assert torch.isfinite(vol.float()).all() and torch.isfinite(txt.float()).all()


def test_param_groups_split():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"logit_scale", "fusion.cls_token", "slice_encoder.backbone.cls_token",
            "slice_encoder.backbone.pos_embed", "text.positional_embedding", "fusion.norm.weight",
            "fusion.proj_out.bias", "slice_encoder.backbone.blocks.0.ls1.gamma"} <= no_decay_names
    assert {"fusion.proj_in.weight", "text.token_embedding.weight", "slice_encoder.backbone.blocks.0.attn.qkv.weight",
            "text.text_projection"} <= decay_names
    assert len(decay_names) + len(no_decay_names) == sum(1 for _ in model.parameters())


def test_slice_encoder_id_follows_weights():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert a.slice_encoder_id() == b.slice_encoder_id()
    assert a.slice_encoder_id().startswith("tiny_vit@56px:sha256=")
    with torch.no_grad():
        b.slice_encoder.backbone.patch_embed.proj.weight[0, 0, 0, 0] += 1
    assert a.slice_encoder_id() != b.slice_encoder_id()
    # the same weights under another slice normalisation give other features: another cache key
    w = tiny_model(seed=0, slice_norm="window")
    assert w.slice_encoder.weights_sha256() == a.slice_encoder.weights_sha256()
    assert w.slice_encoder_id() != a.slice_encoder_id() and ":norm=window:" in w.slice_encoder_id()


# ---------------------------------------------------------------- DINOv2 official layout


def to_official_dinov2(timm_state: dict[str, torch.Tensor], registers: bool) -> dict[str, torch.Tensor]:
    """timm DINOv2 state dict (at 518 px) -> the layout of Meta's dinov2_*_pretrain.pth files."""
    out = {("register_tokens" if k == "reg_token" else k): v.clone() for k, v in timm_state.items()}
    dim = out["cls_token"].shape[-1]
    if registers:  # timm folds the CLS position into cls_token and keeps patch positions only
        cls_pos = torch.randn(1, 1, dim) * 0.02
        out["pos_embed"] = torch.cat([cls_pos, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - cls_pos
    out["mask_token"] = torch.zeros(1, dim)
    return out


@pytest.fixture(scope="module", params=["dinov2_vits14", "dinov2_vits14_reg"])
def official_dinov2(request, tmp_path_factory):
    """(name, source timm model at 518 px with dynamic size, path of its official-layout .pth)."""
    name = request.param
    torch.manual_seed(1)
    source = timm.create_model(DINOV2_ARCHS[name][0], pretrained=False, num_classes=0, img_size=518,
                               dynamic_img_size=True, weight_init="skip").eval()
    with torch.no_grad():  # own init instead of timm's slow one; layer scale far from 1e-5 so blocks count
        for key, p in source.named_parameters():
            p.normal_(1.0 if key.endswith("norm1.weight") or key.endswith("norm2.weight") else 0.0, 0.05)
    state = to_official_dinov2(source.state_dict(), registers=name.endswith("_reg"))
    assert state["pos_embed"].shape == (1, 37 * 37 + 1, 384) and "mask_token" in state
    assert ("register_tokens" in state) == name.endswith("_reg") and "reg_token" not in state
    path = tmp_path_factory.mktemp("dinov2") / f"{name}_pretrain.pth"
    torch.save(state, path)
    return name, source, path


def test_official_dinov2_file_loads_to_the_same_outputs(official_dinov2):
    name, source, path = official_dinov2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = build_slice_encoder(name, image_size=224, weights=path)
    assert not [w for w in caught if "RANDOMLY" in str(w.message)]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        # the source resamples its 37x37 position table to 16x16 on the fly, as the loader does once
        torch.testing.assert_close(enc.backbone.eval()(x), source(x), atol=1e-5, rtol=1e-5)
    assert enc.width == 384


def test_hub_source_goes_through_the_same_conversion(official_dinov2, monkeypatch):
    name, source, path = official_dinov2
    state = torch.load(path, weights_only=True)

    class Official(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return dict(state)

    calls = []
    monkeypatch.setattr(torch.hub, "load", lambda repo, model: calls.append((repo, model)) or Official())
    enc = build_slice_encoder(name, image_size=224, source="hub")
    assert calls == [("facebookresearch/dinov2", name)]
    assert "state_dict" not in enc.backbone.pretrained_cfg
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc.backbone.eval()(x), source(x), atol=1e-5, rtol=1e-5)


def test_wrong_size_dinov2_file_fails_before_building(official_dinov2, monkeypatch):
    name, _, path = official_dinov2

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the weights were checked")

    monkeypatch.setattr(timm, "create_model", no_build)
    with pytest.raises(ValueError, match=r"expected embed dim 768.*found embed dim 384") as err:
        create_model(tiny_cfg(slice_encoder="dinov2_vitb14" + name.removeprefix("dinov2_vits14"),
                             dinov2_weights=str(path)))
    assert f"looks like {name}" in str(err.value)
    other = "dinov2_vits14" if name.endswith("_reg") else "dinov2_vits14_reg"
    with pytest.raises(ValueError, match="register tokens"):
        build_slice_encoder(other, weights=path)


def test_dinov2_without_weights_warns_loudly(monkeypatch):
    calls = []
    real = timm.create_model

    def small(name, **kwargs):  # the real ViT-S/14 init is slow; record the call, build a tiny one
        calls.append((name, kwargs))
        return real(name, **{**kwargs, "embed_dim": 64, "depth": 1, "num_heads": 2})

    monkeypatch.setattr(timm, "create_model", small)
    with pytest.warns(UserWarning, match="RANDOMLY"):
        enc = build_slice_encoder("dinov2_vits14_reg", image_size=28)
    assert calls == [("vit_small_patch14_reg4_dinov2", dict(pretrained=False, num_classes=0, img_size=28))]
    assert enc.width == 64


# ---------------------------------------------------------------- text


def test_sentence_embeddings_make_the_report_and_match_a_one_sentence_prompt():
    """`encode_text_sentences` (the sentence-image term): the reports' embeddings are `encode_text`'s, identical
    sentences share a group across reports, and at evaluation a sentence inside a report is embedded exactly as the
    same sentence given alone (a zero-shot prompt)."""
    from ctclip.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn").train()
    texts = ["No pleural effusion was detected. Cardiomegaly is present.",
             "Heart size is normal. No pleural effusion was detected.",
             "Bilateral pleural effusion. Heart size is normal. A 4.5 mm nodule is present."]
    tokens = model.tokenize(texts)
    reports, sent = model.encode_text_sentences(tokens)
    torch.testing.assert_close(reports, model.encode_text(tokens))
    assert sent.text.tolist() == [0, 0, 1, 1, 2, 2, 2]  # "4.5 mm": a decimal point, not a sentence end
    g = sent.group.tolist()
    assert g[0] == g[3] and g[2] == g[5] and len({g[0], g[1], g[2], g[4], g[6]}) == 5
    torch.testing.assert_close(sent.features.norm(dim=-1), torch.ones(7))
    model.eval()
    _, sent = model.encode_text_sentences(tokens)
    alone = model.encode_text(model.tokenize(["Cardiomegaly is present.", "Bilateral pleural effusion."]))
    torch.testing.assert_close(alone, sent.features[[1, 4]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="text_pool 'sentence'"):
        tiny_model().encode_text_sentences(tokens)


def test_tokenizer_context_length_and_truncation():
    tokens = tokenize(["Small hiatal hernia.", "word " * 200])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, 0] == EOT - 1 and (tokens[0] == EOT).sum() == 1 and tokens[0, -1] == 0
    assert tokens[1, -1] == EOT and (tokens[1] != 0).all()
    long = tokenize(["word " * 200], context_length=256)
    assert long.shape == (1, 256) and (long[0, :202] != 0).all() and long[0, 201] == EOT


def test_longer_context_model_works():
    model = tiny_model(context_length=160)
    tokens = model.tokenize(["there is " * 70])
    assert tokens.shape == (1, 160) and model.text.positional_embedding.shape == (160, 64)
    assert model.encode_text(tokens).shape == (1, 64)


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
    """A tiny open_clip CLIP in OpenAI's layout, saved as a state dict and as a TorchScript archive."""
    torch.manual_seed(2)
    clip = CLIP(embed_dim=48, quick_gelu=True,
                vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                text_cfg=CLIPTextCfg(context_length=77, width=64, heads=2, layers=2)).eval()
    folder = tmp_path_factory.mktemp("clip")
    torch.save(clip.state_dict(), folder / "clip_state.pt")
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; OpenAI still ships such archives
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(clip).save(str(folder / "clip_jit.pt"))
    return clip, folder


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("filename", ["clip_state.pt", "clip_jit.pt"])
def test_openai_text_weights_load(openai_clip, filename):
    clip, folder = openai_clip
    model = tiny_model(embed_dim=48, text_weights=str(folder / filename)).eval()
    texts = ["Mild cardiomegaly.", "No pleural effusion or pneumothorax."]
    with torch.no_grad():
        expected = clip.encode_text(open_clip.tokenize(texts), normalize=True)
        torch.testing.assert_close(model.encode_text(model.tokenize(texts)), expected, atol=1e-5, rtol=1e-5)


def test_openai_text_weights_other_context_lengths(openai_clip):
    clip, folder = openai_clip
    texts = ["Mild cardiomegaly."]
    with torch.no_grad():
        expected = clip.encode_text(open_clip.tokenize(texts), normalize=True)
        short = tiny_model(embed_dim=48, context_length=32, text_weights=str(folder / "clip_state.pt")).eval()
        # causal attention: a text ending before position 32 sees exactly the same positions
        torch.testing.assert_close(short.encode_text(short.tokenize(texts)), expected, atol=1e-5, rtol=1e-5)
        long = tiny_model(embed_dim=48, context_length=128, text_weights=str(folder / "clip_state.pt")).eval()
    pos = long.text.positional_embedding
    assert pos.shape == (128, 64)
    torch.testing.assert_close(pos[[0, -1]], clip.positional_embedding[[0, -1]])
    assert torch.isfinite(long.encode_text(long.tokenize(texts))).all()


def test_openai_text_weights_mismatch_errors(openai_clip):
    _, folder = openai_clip
    with pytest.raises(ValueError, match=r"text_projection \(64, 48\) != \(text_width, embed_dim\) \(64, 64\)"):
        tiny_model(text_weights=str(folder / "clip_state.pt"))
    narrow = build_text_tower(context_length=77, width=32, layers=2, heads=2, embed_dim=48)
    with pytest.raises(ValueError, match="text width 64 .* != text_width 32"):
        load_openai_text_weights(narrow, folder / "clip_state.pt")
    deeper = build_text_tower(context_length=77, width=64, layers=3, heads=2, embed_dim=48)
    with pytest.raises(ValueError, match="2 text layers != text_layers 3"):
        load_openai_text_weights(deeper, folder / "clip_state.pt")


# ---------------------------------------------------------------- slice encoders and other backbones


def test_slice_encoder_names():
    names = list_slice_encoders()
    assert "tiny_vit" in names and "tiny_cnn" in names
    assert {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")} <= set(names)
    widths = {n: DINOV2_ARCHS[n][1] for n in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")}
    assert widths == {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}


def test_unknown_names_and_settings_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown slice encoder 'dinov3_vitb16'.*tiny_vit"):
        create_model(tiny_cfg(slice_encoder="dinov3_vitb16"))
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_slice_encoder("timm:no_such_net")
    with pytest.raises(ValueError, match="unknown open_clip model 'RN51'"):
        build_slice_encoder("openclip:RN51")
    bad = tmp_path / "model.yaml"
    bad.write_text("slice_encoder: tiny_vit\nfusion_width: 64\ntext_depth: 2\n")
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['fusion_width', 'text_depth'\]"):
        model_config_from_yaml(bad)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_cfg(fusion_heads=3)
    with pytest.raises(ValueError, match="choose one"):
        build_slice_encoder("dinov2_vits14", weights=tmp_path / "w.pth", source="hub")
    with pytest.raises(FileNotFoundError):
        build_slice_encoder("dinov2_vits14", weights=tmp_path / "missing.pth")


def test_timm_encoder_builds_and_loads_a_local_file(tmp_path):
    with pytest.warns(UserWarning, match="RANDOMLY"):
        enc = build_slice_encoder("timm:resnet18", image_size=64, chunk=3)
    assert enc.width == 512 and enc(volumes(b=1, d=4, hw=48)).shape == (1, 4, 512)
    torch.save(enc.backbone.state_dict(), tmp_path / "resnet18.pth")
    loaded = build_slice_encoder("timm:resnet18", image_size=64, weights=tmp_path / "resnet18.pth")
    vol = volumes(b=1, d=2, hw=48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(vol), enc.eval()(vol))


def test_openclip_visual_tower_builds():
    with pytest.warns(UserWarning, match="RANDOMLY"):
        enc = build_slice_encoder("openclip:RN50", image_size=64)
    assert enc.width == 1024
    assert enc.mean.flatten().tolist() == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    with torch.no_grad():
        assert enc.eval()(volumes(b=1, d=2, hw=48)).shape == (1, 2, 1024)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_openclip_visual_tower_loads_clip_weights(openai_clip, monkeypatch):
    clip, folder = openai_clip  # vision: ViT, patch 8, 16 px; registered under a test name
    tiny = {"embed_dim": 48, "quick_gelu": True,
            "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
            "text_cfg": {"context_length": 77, "width": 64, "heads": 2, "layers": 2}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-tiny-clip", tiny)
    vol = volumes(b=1, d=3, hw=20)
    for filename in ("clip_state.pt", "clip_jit.pt"):
        enc = build_slice_encoder("openclip:test-tiny-clip", image_size=16, weights=folder / filename).eval()
        with torch.no_grad():
            expected = clip.encode_image(enc.preprocess(vol[0].transpose(0, 1)))
            torch.testing.assert_close(enc(vol)[0], expected, atol=1e-5, rtol=1e-5)
    # a larger image size resamples the ViT position grid instead of failing
    assert build_slice_encoder("openclip:test-tiny-clip", image_size=32, weights=folder / "clip_state.pt").width == 48
    wide = {**tiny, "vision_cfg": {**tiny["vision_cfg"], "width": 64}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-tiny-clip-wide", wide)
    with pytest.raises(ValueError, match="does not fit open_clip visual tower 'test-tiny-clip-wide'"):
        build_slice_encoder("openclip:test-tiny-clip-wide", image_size=16, weights=folder / "clip_state.pt")


# ---------------------------------------------------------------- from-scratch pieces


def test_trimmed_text_forward_equals_the_full_context():
    """encode_tokens stops at the batch's longest text; with the causal mask that changes nothing."""
    from ctclip.models.text import encode_tokens

    torch.manual_seed(0)
    tower = build_text_tower(256, 64, 2, 2, 32).eval()
    texts = ["Pleural effusion is not present.", "Cardiomegaly. " * 30, ""]
    tokens = tokenize(texts, 256)
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(tower, tokens), tower(tokens), atol=1e-5, rtol=1e-5)
        full = tokenize(["word " * 300], 256)  # cut at the context: nothing to trim, the full forward runs
        torch.testing.assert_close(encode_tokens(tower, full), tower(full))
    # the gradient reaches the same parameters (none of the padding positions' embeddings matter)
    encode_tokens(tower, tokens).sum().backward()
    assert tower.token_embedding.weight.grad is not None and tower.positional_embedding.grad is not None


def test_non_causal_text_sees_the_negation_everywhere_and_never_the_padding():
    from ctclip.models.text import encode_tokens

    torch.manual_seed(0)
    tower = build_text_tower(64, 64, 2, 2, 32).eval()
    pos, neg = tokenize(["Pleural effusion is present.", "Pleural effusion is not present."], 64)
    n_shared = 4  # start token, "pleural", "effusion", "is"
    assert torch.equal(pos[:n_shared], neg[:n_shared])

    def token_features(tokens, causal):
        length = int((tokens != 0).sum())
        x = tower.token_embedding(tokens[None, :length]) + tower.positional_embedding[:length]
        mask = tower.attn_mask[:length, :length] if causal else None  # one unpadded text: no padding to hide
        return tower.transformer(x, attn_mask=mask)[0]

    with torch.no_grad():
        # causal: the words before "not" are the same features in both sentences; non-causal: they differ
        torch.testing.assert_close(token_features(pos, True)[:n_shared], token_features(neg, True)[:n_shared])
        assert (token_features(pos, False)[:n_shared] - token_features(neg, False)[:n_shared]).abs().max() > 1e-3
        # batched with a longer text (more padding) = alone = the unpadded oracle (mean of the token features)
        longer = tokenize(["Cardiomegaly is present. " * 8], 64)[0]
        batched = encode_tokens(tower, torch.stack([neg, longer]), "mean", causal=False)[0]
        alone = encode_tokens(tower, neg[None], "mean", causal=False)[0]
        feats = tower.ln_final(token_features(neg, False))
        oracle = tower.text_projection(feats.mean(0)) if isinstance(tower.text_projection, torch.nn.Linear) \
            else feats.mean(0) @ tower.text_projection
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, oracle, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs text pool 'mean' or 'sentence'"):
        encode_tokens(tower, neg[None], "eot", causal=False)
    with pytest.raises(ValueError, match="text_causal false needs text_pool mean or sentence"):
        tiny_cfg(text_causal=False)


def test_sentence_layout_splits_at_periods_but_not_at_decimal_points():
    from ctclip.models.text import sentence_layout

    tokens = tokenize(["No effusion. Node of 4.5 mm. Mild", ""], 32)
    # <sot> no ef fusion . node of 4 . 5 mm . mild <eot>
    sentence, position, word = sentence_layout(tokens)
    n = 14
    assert sentence[0, 1:n - 1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2]
    assert position[0, 1:n - 1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0]
    assert word[0].tolist() == [False] + [True] * (n - 2) + [False] * (32 - n + 1)
    assert not word[1].any()  # an empty text: the start and end tokens only


def test_sentence_pooling_embeds_a_report_as_the_mean_of_its_sentences_each_alone():
    """text_pool 'sentence': every sentence of a report is encoded exactly as it would be on its own (a prompt
    is one sentence), and the report is their mean: the oracle encodes each sentence as its own text."""
    from ctclip.models.text import encode_tokens

    torch.manual_seed(0)
    tower = build_text_tower(96, 64, 2, 2, 32).eval()
    sentences = ["No pleural effusion was detected.", "A node of 4.5 mm is seen.", "Cardiomegaly is present.",
                 "Emphysema is not present"]  # the last one truncated: no period
    report = " ".join(sentences)
    with torch.no_grad():
        batch = encode_tokens(tower, tokenize([report, "Heart size is normal. " * 3, ""], 96), "sentence",
                              causal=False)
        alone = encode_tokens(tower, tokenize(sentences, 96), "sentence", causal=False)
        torch.testing.assert_close(batch[0], alone.mean(0), atol=1e-5, rtol=1e-5)
        # the order of the sentences does not matter, the order of the words does
        shuffled = encode_tokens(tower, tokenize([" ".join(sentences[2::-1] + sentences[3:])], 96), "sentence",
                                 causal=False)
        torch.testing.assert_close(shuffled[0], batch[0], atol=1e-5, rtol=1e-5)
        swapped = encode_tokens(tower, tokenize(["Present is cardiomegaly."], 96), "sentence", causal=False)
        assert (swapped[0] - alone[2]).abs().max() > 1e-3
        assert batch[2].abs().max() == 0  # no words, no embedding (the centring layer handles the rest)
    grads = encode_tokens(tower, tokenize([report], 96), "sentence", causal=False)
    grads.sum().backward()
    assert tower.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text pool 'sentence' needs a non-causal"):
        encode_tokens(tower, tokenize([report], 96), "sentence", causal=True)
    with pytest.raises(ValueError, match="text_pool sentence needs text_causal false"):
        tiny_cfg(text_pool="sentence")
    model = CTCLIP(tiny_cfg(text_pool="sentence", text_causal=False)).eval()
    assert model.encode_text(model.tokenize([report])).shape == (1, model.cfg.embed_dim)


def test_packed_sentences_equal_the_whole_report_sentence_mask_forward_and_backward():
    """The packed sentence pool (rows of several short sentences) against the reference that runs the tower
    over whole reports under a (B, L, L) sentence mask (benchmarks/bench_text_pool.py): the same embeddings
    and the same gradients, on synthetic CT-RATE reports with an empty text and a report cut by the context."""
    from benchmarks.bench_text_pool import masked_sentence_pool, synthetic_reports
    from ctclip.models.text import encode_tokens

    torch.manual_seed(0)
    tower = build_text_tower(128, 32, 2, 2, 16)
    texts = synthetic_reports(5, seed=3) + ["", "Heart size is normal. A node of 4.5 mm is seen."]
    tokens = tokenize(texts, 128)  # the synthetic reports run past 128 tokens: truncated mid-sentence
    assert (tokens != 0).sum(dim=1).max() == 128
    grads = []
    for pool in (lambda t: encode_tokens(tower, t, "sentence", causal=False), lambda t: masked_sentence_pool(tower, t)):
        tower.zero_grad()
        out = pool(tokens)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}))
    (packed, g_packed), (masked, g_masked) = grads
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-4)
    assert packed[5].abs().max() == 0  # the empty text
    assert g_packed.keys() == g_masked.keys()
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_masked[name], atol=1e-5, rtol=1e-3, msg=name)


def test_pack_sentences_places_every_sentence_once_without_overlap():
    from ctclip.models.text import pack_sentences

    rng = np.random.default_rng(0)
    for lengths in (np.array([5]), np.array([3, 3, 3, 3]), rng.integers(1, 40, size=200)):
        row, offset, capacity = pack_sentences(lengths)
        assert capacity == lengths.max()
        assert (offset >= 0).all() and (offset + lengths <= capacity).all()
        cells = np.zeros((row.max() + 1, capacity), dtype=int)
        for r, o, n in zip(row, offset, lengths):
            cells[r, o:o + n] += 1
        assert cells.max() == 1 and cells.sum() == lengths.sum()
        # first-fit decreasing is within 11/9 OPT + 1 rows; OPT >= total / capacity
        assert row.max() + 1 <= 11 / 9 * np.ceil(lengths.sum() / capacity) + 1


def test_window_slice_norm_keeps_absolute_density():
    """minmax makes one grey a different value in every slice; window keeps the store's HU window."""
    vol = torch.zeros(1, 1, 2, 8, 8, dtype=torch.uint8)
    vol[0, 0, :, :4] = 130  # the same tissue in both slices
    vol[0, 0, 0, 4:] = 255  # bone in slice 0, fat in slice 1
    vol[0, 0, 1, 4:] = 110
    for norm, same in (("minmax", False), ("window", True)):
        enc = build_slice_encoder("tiny_cnn", image_size=8, slice_norm=norm)
        x = enc.preprocess(vol[0].transpose(0, 1)) * enc.std + enc.mean
        assert x.shape == (2, 1, 8, 8)
        assert torch.allclose(x[0, 0, 0, 0], x[1, 0, 0, 0]) is same, norm
        if norm == "window":
            assert x[0, 0, 0, 0].item() == pytest.approx(130 / 255)
    with pytest.raises(ValueError, match="slice_norm"):
        build_slice_encoder("tiny_cnn", slice_norm="zscore")


def test_tiny_cnn_model_keeps_position_and_trains():
    model = tiny_model(slice_encoder="tiny_cnn", image_size=32, slice_norm="window")
    assert model.slice_encoder.mean.numel() == 1  # one grey channel
    feats = model.encode_slices(volumes(b=2, d=3, hw=32))
    assert feats.shape == (2, 3, model.slice_encoder.width)
    # the same blob left or right of the slice gives different features (no global pooling)
    a = torch.zeros(1, 1, 1, 32, 32, dtype=torch.uint8)
    b = a.clone()
    a[..., 10:16, 2:8] = 200
    b[..., 10:16, 24:30] = 200
    with torch.no_grad():
        assert not torch.allclose(model.encode_slices(a), model.encode_slices(b), atol=1e-3)
    vol, txt, scale = model(volumes(b=2, d=3, hw=32), model.tokenize(["a", "b"]))
    (scale * vol @ txt.T).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.slice_encoder.backbone.parameters())


def test_checkpoint_of_another_slice_norm_is_refused(tmp_path):
    from ctclip.checkpoint import CheckpointError, check_model_config

    now = dataclasses.asdict(tiny_cfg(slice_norm="window"))
    old = {k: v for k, v in dataclasses.asdict(tiny_cfg()).items() if k != "slice_norm"}  # before the setting
    with pytest.raises(CheckpointError, match="slice_norm: checkpoint 'minmax' vs now 'window'"):
        check_model_config(old, now, tmp_path / "latest.pt")
    check_model_config(dataclasses.asdict(tiny_cfg(slice_norm="window")), now, tmp_path / "latest.pt")


def test_ct_windows_match_a_numpy_windowing():
    """ct_windows: three HU windows of the uint8 store (0 = -1000 HU, 255 = +1000 HU), one per channel."""
    from ctclip.models.slice_encoder import CT_WINDOWS_HU

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(2, 1, 16, 16), dtype=np.uint8)
    enc = build_slice_encoder("tiny_cnn", image_size=16, slice_norm="ct_windows")
    assert enc.mean.numel() == 3 and enc.backbone.features[0].in_channels == 3
    got = (enc.preprocess(torch.from_numpy(raw)) * enc.std + enc.mean).numpy()
    hu = -1000.0 + raw[:, 0].astype(np.float64) * 2000.0 / 255.0
    for c, (lo, hi) in enumerate(CT_WINDOWS_HU):
        np.testing.assert_allclose(got[:, c], np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_mean_text_pool_averages_the_text_tokens():
    from ctclip.models.text import encode_tokens

    torch.manual_seed(0)
    tower = build_text_tower(64, 32, 2, 2, 16).eval()
    texts = ["Pleural effusion is not present.", "Cardiomegaly."]
    tokens = tokenize(texts, 64)
    with torch.no_grad():
        got = encode_tokens(tower, tokens, "mean")
        # the reference: the tower's own full-context token features, averaged over each text's tokens
        x = tower.token_embedding(tokens) + tower.positional_embedding
        x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
        keep = (tokens != 0).float().unsqueeze(-1)
        ref = ((x * keep).sum(1) / keep.sum(1)) @ tower.text_projection
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, encode_tokens(tower, tokens, "eot"))
    with pytest.raises(ValueError, match="text pool"):
        encode_tokens(tower, tokens, "max")
    with pytest.raises(ValueError, match="text_pool"):
        tiny_cfg(text_pool="max")


def test_embed_center_centres_the_batch_and_is_checked_on_resume(tmp_path):
    from ctclip.checkpoint import CheckpointError, check_model_config
    from ctclip.models.clip3d import BatchCenter

    model = tiny_model(slice_encoder="tiny_cnn", image_size=32, slice_norm="window", embed_center=True,
                       text_pool="mean")
    assert isinstance(model.volume_center, BatchCenter) and isinstance(model.text_center, BatchCenter)
    raw = model.fusion(model.encode_slices(volumes(b=4, d=3, hw=32)))
    centred = model.volume_center(raw)
    torch.testing.assert_close(centred.mean(0), torch.zeros(raw.shape[1]), atol=1e-5, rtol=0)
    assert model.encode_volume(volumes(b=1, d=3, hw=32)).shape == (1, model.cfg.embed_dim)  # one row: no error
    model.eval()  # running statistics: a volume's embedding does not depend on its batch
    v = volumes(b=3, d=3, hw=32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_volume(v)[:1], model.encode_volume(v[:1]), atol=1e-5, rtol=1e-5)
    plain = tiny_model()
    assert isinstance(plain.volume_center, torch.nn.Identity) and "volume_center.running_mean" not in plain.state_dict()
    now = dataclasses.asdict(tiny_cfg(embed_center=True, text_pool="mean"))
    old = {k: v for k, v in dataclasses.asdict(tiny_cfg()).items() if k not in ("embed_center", "text_pool")}
    with pytest.raises(CheckpointError, match="text_pool: checkpoint 'eot' vs now 'mean'"):
        check_model_config(old, now, tmp_path / "latest.pt")
    # a checkpoint from before fusion_pool / text_causal was a CLS, causal model
    older = {k: v for k, v in old.items() if k not in ("fusion_pool", "text_causal")}
    check_model_config(older, dataclasses.asdict(tiny_cfg()), tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match="fusion_pool: checkpoint 'cls' vs now 'max'.*text_causal: checkpoint "
                                              "True vs now False"):
        check_model_config(older, dataclasses.asdict(tiny_cfg(fusion_pool="max", text_pool="mean", text_causal=False)),
                           tmp_path / "latest.pt")

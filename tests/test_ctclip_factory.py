"""The ctclip model factory: architectures shipped in the package, configs by name or path, overrides,
create_model, and ModelChoice (the training script's model flags)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from ctclip.models import (
    CTCLIP,
    ModelChoice,
    ModelConfig,
    create_model,
    get_model_config,
    list_models,
    list_slice_encoders,
    model_config_from_yaml,
)
from ctclip.models.factory import configs_dir
from ctcore.schema import add_arguments

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ["dinov2_vitb14", "dinov2_vitg14", "dinov2_vitl14", "dinov2_vits14", "tiny", "tiny_cnn"]


def config_path(name: str) -> Path:
    return Path(str(configs_dir().joinpath(f"{name}.yaml")))


def test_list_models_names_the_six_architectures():
    assert list_models() == ARCHITECTURES


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_loads_by_name_as_from_its_file(name):
    cfg = get_model_config(name)
    assert isinstance(cfg, ModelConfig) and cfg.slice_encoder in list_slice_encoders()
    assert cfg == model_config_from_yaml(config_path(name))
    assert get_model_config(str(config_path(name))) == cfg == get_model_config(config_path(name))


def test_architectures_are_package_data_where_the_installed_package_looks():
    folder = resources.files("ctclip.models").joinpath("configs")
    for name in ARCHITECTURES:
        assert folder.joinpath(f"{name}.yaml").is_file(), name
    # and the wheel takes them: setuptools package data of ctclip.models
    pyproject = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?:\n\[|\Z)", pyproject, flags=re.M | re.S)
    assert table and re.search(r'^"ctclip\.models" = \[.*"configs/\*\.yaml".*\]', table.group(1), flags=re.M)


def test_overrides_apply_and_none_is_ignored():
    base = get_model_config("tiny")
    cfg = get_model_config("tiny", slice_chunk=4, text_weights=None, slice_norm="window", dinov2_weights=None)
    assert cfg == dataclasses.replace(base, slice_chunk=4, slice_norm="window")
    assert get_model_config("tiny", context_length=None) == base
    with pytest.raises(ValueError, match=r"unknown model setting\(s\) \['fusion_width'\]"):
        get_model_config("tiny", fusion_width=32)
    with pytest.raises(ValueError, match="not divisible"):  # overrides are validated like the file
        get_model_config("tiny", fusion_heads=3)


def test_unknown_name_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown model architecture 'vit_huge'; known: dinov2_vitb14, .*tiny_cnn"):
        get_model_config("vit_huge")
    with pytest.raises(FileNotFoundError):
        get_model_config(tmp_path / "missing.yaml")


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose a lot when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_create_model_builds_and_runs(one_thread):
    torch.manual_seed(0)
    model = create_model("tiny")
    assert isinstance(model, CTCLIP) and model.cfg == get_model_config("tiny")
    volumes = torch.randint(0, 256, (2, 1, 5, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        vol, txt, scale = model(volumes, model.tokenize(["no acute findings", "bilateral pleural effusion"]))
    assert vol.shape == txt.shape == (2, 64) and scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    # a ModelConfig is taken as it is: same seed, same weights
    cfg = get_model_config("tiny")
    torch.manual_seed(0)
    same = create_model(cfg)
    assert same.cfg is cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    # overrides, on a name or on a config
    assert create_model("tiny", embed_dim=32).cfg == create_model(cfg, embed_dim=32).cfg
    assert create_model(cfg, embed_dim=32, text_weights=None).cfg.embed_dim == 32


# ---------------------------------------------------------------- ModelChoice: the training script's flags


def test_model_choice_defaults_are_the_script_flags():
    from scripts.ctclip_train import build_parser

    script = {a.dest: a for a in build_parser()._actions}
    ours = argparse.ArgumentParser()
    add_arguments(ours, ModelChoice)
    for action in ours._actions[1:]:  # [0] is -h
        theirs = script[action.dest]
        for key in ("option_strings", "default", "type", "choices", "nargs", "const", "required"):
            assert getattr(action, key) == getattr(theirs, key), (action.dest, key)
        assert type(action) is type(theirs), action.dest
    assert {f.name for f in dataclasses.fields(ModelChoice)} == {a.dest for a in ours._actions[1:]}


def test_model_choice_resolve():
    assert ModelChoice().resolve() == get_model_config("dinov2_vitb14")
    choice = ModelChoice(model_config="tiny", dinov2_model_name="tiny_cnn", context_length=96, slice_chunk=3,
                         slice_norm="window", freeze_dinov2=True, grad_checkpointing=True, dinov2_source="hub",
                         dinov2_weights="w.pth", text_weights="t.pt")
    assert choice.resolve() == dataclasses.replace(
        get_model_config("tiny"), slice_encoder="tiny_cnn", context_length=96, slice_chunk=3, slice_norm="window",
        freeze_dinov2=True, grad_checkpointing=True, dinov2_source="hub", dinov2_weights="w.pth", text_weights="t.pt")


def test_model_choice_switches_only_turn_on(tmp_path):
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text(config_path("tiny").read_text() + "freeze_dinov2: true\ngrad_checkpointing: true\n")
    cfg = ModelChoice(model_config=str(frozen)).resolve()  # the flags' False means "not given"
    assert cfg.freeze_dinov2 and cfg.grad_checkpointing


def test_slice_norm_flag_takes_every_documented_norm():
    from ctclip.models.slice_encoder import SLICE_NORMS
    from scripts.ctclip_train import build_parser

    for norm in SLICE_NORMS:  # docs/ctclip.md: minmax, window, ct_windows or window_mediastinal
        args = build_parser().parse_args(["--ct_filepath", "a.h5", "--txt_filepath", "r.csv", "--slice_norm", norm])
        assert args.slice_norm == norm
    assert set(SLICE_NORMS) == {"minmax", "window", "ct_windows", "window_mediastinal"}

"""YAML defaults + command-line overrides + resolved config."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ctcore.cli import parse_args, save_resolved, to_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--out_dir", type=Path, required=False, default=Path("out"))
    p.add_argument("--size", type=int, nargs=2, default=[512, 512])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=["raw", "hu"], default="raw")
    return p


@dataclass
class Cfg:
    out_dir: Path
    size: list[int]
    seed: int
    variant: str


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"size": ["64", 48], "seed": 3, "variant": "hu"}))
    ns = parse_args(_parser(), ["--config", str(cfg), "--seed", "7"])
    assert ns.size == [64, 48] and ns.seed == 7 and ns.variant == "hu"
    c = to_config(Cfg, ns)
    assert c == Cfg(Path("out"), [64, 48], 7, "hu")


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sede: 3\n")
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--config", str(cfg)])
    assert "unknown key(s) sede" in capsys.readouterr().err


@pytest.mark.parametrize("text,msg", [("- 1\n- 2\n", "expected a mapping"), ("a: [1\n", "not valid YAML")])
def test_bad_yaml_is_reported(tmp_path, capsys, text, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--config", str(cfg)])
    assert msg in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--config", str(tmp_path / "nope.yaml")])
    assert "no such file" in capsys.readouterr().err


def test_save_resolved_roundtrip(tmp_path):
    c = Cfg(Path("a/b"), [1, 2], 5, "raw")
    y = yaml.safe_load(save_resolved(c, tmp_path / "r.yaml").read_text())
    j = json.loads(save_resolved(c, tmp_path / "r.json").read_text())
    assert y == j == {"out_dir": "a/b", "size": [1, 2], "seed": 5, "variant": "raw"}

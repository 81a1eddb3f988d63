"""YAML defaults + command-line overrides + resolved config."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from ctcore import schema
from ctcore.cli import parse_args, save_resolved, to_config
from ctcore.errors import UsageError


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


# ------------------------------------------------------------------ ctcore.schema: flags from dataclasses

def _even(text: str) -> int:
    if int(text) % 2:
        raise argparse.ArgumentTypeError(f"{text}: not even")
    return int(text)


@dataclass
class Job:
    data_dir: Path = schema.arg(help="input", flags=("-d",))  # no default: a required flag
    output: Path = schema.arg(Path("out.csv"), flags=("-o",), help="where")
    seed: int = 0  # a plain field gets a flag too
    ratio: float | None = None
    label: str = "x"
    fast: bool = False  # store_true
    fix: bool = True  # --fix / --no-fix
    progress: bool = schema.arg(True, action="store_false")  # --no_progress
    shape: tuple[int, int, int] = (4, 5, 6)
    sizes: tuple[int, ...] = (1,)
    folds: list[int] | None = None
    milestones: list[int] = schema.arg(default_factory=lambda: [2, 3], nargs="*")
    mode: Literal["a", "b"] = "a"
    kind: str = schema.arg("p", choices=("p", "q"))
    even: int = schema.arg(2, type=_even)
    workers: int = schema.arg(-1, flags=("--n_jobs", "-j"))
    weights: dict[str, float] = schema.arg(default_factory=dict, cli_default=None, metavar="NAME=P")
    hidden: str = schema.arg("kept", cli=False)


def _job_parser() -> argparse.ArgumentParser:
    return schema.build_parser(Job, description="a job")


def test_schema_flags_follow_the_annotations():
    p = _job_parser()
    acts = {a.dest: a for a in p._actions}
    assert acts["data_dir"].required and acts["data_dir"].option_strings == ["--data_dir", "-d"]
    assert acts["data_dir"].type is Path and acts["data_dir"].default is None
    assert acts["output"].default == Path("out.csv") and not acts["output"].required
    assert acts["seed"].type is int and acts["ratio"].type is float and acts["label"].type is None
    assert type(acts["fast"]).__name__ == "_StoreTrueAction" and acts["fast"].default is False
    assert isinstance(acts["fix"], argparse.BooleanOptionalAction) and acts["fix"].default is True
    assert acts["progress"].option_strings == ["--no_progress"] and acts["progress"].default is True
    assert (acts["shape"].nargs, acts["sizes"].nargs, acts["folds"].nargs, acts["milestones"].nargs) == (3, "+", "+", "*")
    assert acts["mode"].choices == ["a", "b"] and acts["kind"].choices == ("p", "q")
    assert acts["even"].type is _even and acts["workers"].option_strings == ["--workers", "--n_jobs", "-j"]
    assert acts["weights"].default is None and acts["weights"].metavar == "NAME=P"
    assert "hidden" not in acts and "--verbose" in p._option_string_actions and "--config" in p._option_string_actions
    assert schema.build_parser(Job, verbose=False)._option_string_actions.get("--verbose") is None


def test_schema_parses_into_the_dataclass():
    ns = schema.parse(_job_parser(), ["-d", "in", "--fast", "--no-fix", "--no_progress", "--shape", "1", "2", "3",
                                      "--sizes", "7", "8", "--mode", "b", "-j", "3", "--even", "4",
                                      "--weights", "a=0.5", "--milestones"])
    cfg = schema.config_from(Job, ns)
    assert cfg.data_dir == Path("in") and cfg.output == Path("out.csv")
    assert cfg.fast and not cfg.fix and not cfg.progress
    assert cfg.shape == (1, 2, 3) and cfg.sizes == (7, 8) and cfg.milestones == [] and cfg.folds is None
    assert cfg.mode == "b" and cfg.workers == 3 and cfg.even == 4 and cfg.weights == ["a=0.5"]
    cfg = schema.config_from(Job, schema.parse(_job_parser(), ["--data_dir", "in"]))
    assert cfg.fix and cfg.progress and not cfg.fast and cfg.shape == (4, 5, 6) and cfg.weights == {}
    assert cfg.milestones == [2, 3] and cfg.hidden == "kept"


@pytest.mark.parametrize("argv,msg", [([], "the following arguments are required: --data_dir/-d"),
                                      (["-d", "x", "--even", "3"], "3: not even"),
                                      (["-d", "x", "--mode", "c"], "invalid choice: 'c'"),
                                      (["-d", "x", "--shape", "1", "2"], "expected 3 arguments")])
def test_schema_refuses_bad_flags(argv, msg, capsys):
    with pytest.raises(SystemExit):
        schema.parse(_job_parser(), argv)
    assert msg in capsys.readouterr().err


def test_schema_yaml_config_tuple_and_path(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"output": "o/p.csv", "shape": [8, 9, 10], "fix": False, "sizes": ["3"]}))
    ns = schema.parse(_job_parser(), ["--config", str(cfg_file), "-d", "in", "--sizes", "5"])
    cfg = schema.config_from(Job, ns)
    assert cfg.output == Path("o/p.csv") and cfg.shape == (8, 9, 10) and cfg.fix is False and cfg.sizes == (5,)
    cfg_file.write_text("shape: [1, 2, 3]\nsede: 3\nout: x\n")
    with pytest.raises(SystemExit):
        schema.parse(_job_parser(), ["--config", str(cfg_file), "-d", "in"])


def test_schema_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 1\nsede: 3\nhidden: y\n")
    with pytest.raises(SystemExit):
        schema.parse(_job_parser(), ["--config", str(cfg_file), "-d", "in"])
    assert "unknown key(s) hidden, sede" in capsys.readouterr().err


@dataclass
class Needs:
    out_dir: Path = schema.arg(Path("default_out"), needed=True, help="given by flag or YAML")
    overwrite: bool = False


def test_schema_needed_flag_may_come_from_yaml(tmp_path, capsys):
    p = schema.build_parser(Needs)
    assert p._option_string_actions["--out_dir"].default is None and not p._option_string_actions["--out_dir"].required
    with pytest.raises(SystemExit):
        schema.parse(p, [], [Needs])
    assert "--out_dir is required (on the command line or in --config)" in capsys.readouterr().err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("out_dir: y\n")
    assert schema.config_from(Needs, schema.parse(schema.build_parser(Needs), ["--config", str(cfg_file)], [Needs])
                              ).out_dir == Path("y")
    assert Needs().out_dir == Path("default_out")  # calls from code keep the field default


@dataclass
class Extra:
    montage: Path | None = None


def test_run_main_maps_errors_and_reports(capsys, caplog):
    seen = []

    def job(cfg: Needs, extra: Extra):
        seen.append((cfg, extra))
        if cfg.overwrite:
            raise UsageError("cannot overwrite")
        return 7

    def report(result, cfg, extra):
        print(f"result {result} -> {cfg.out_dir} {extra.montage}")
        return 3 if extra.montage else None

    assert schema.run_main((Needs, Extra), job, ["--out_dir", "a"], name="t", report=report) == 0
    assert "result 7 -> a None" in capsys.readouterr().out
    assert schema.run_main((Needs, Extra), job, ["--out_dir", "a", "--montage", "m.png"], name="t",
                           report=report) == 3
    assert seen[-1] == (Needs(Path("a")), Extra(Path("m.png")))
    assert schema.run_main((Needs, Extra), job, ["--out_dir", "a", "--overwrite"], name="t", report=report) == 2
    assert [r.message for r in caplog.records if r.name == "t"] == ["cannot overwrite"]
    assert schema.run_main(Needs, lambda cfg: 1 / 0, ["--out_dir", "a"], name="t",
                           errors={ZeroDivisionError: 5}) == 5
    with pytest.raises(ZeroDivisionError):  # not a mapped error: a bug, with its traceback
        schema.run_main(Needs, lambda cfg: 1 / 0, ["--out_dir", "a"], name="t")
    with pytest.raises(SystemExit) as exit_:  # a usage error: reported as a bad flag would be
        schema.run_main((Needs, Extra), job, ["--out_dir", "a", "--overwrite"], name="t", usage_errors=(ValueError,))
    assert exit_.value.code == 2 and "error: cannot overwrite" in capsys.readouterr().err


def test_print_capped(capsys):
    schema.print_capped([f"  failed {i}" for i in range(3)], "errors.csv", limit=2)
    assert capsys.readouterr().out.splitlines() == ["  failed 0", "  failed 1", "  ... and 1 more in errors.csv"]
    schema.print_capped(["  one"], "x")
    assert capsys.readouterr().out.splitlines() == ["  one"]


def test_a_field_without_a_flag_type_is_refused():
    @dataclass
    class Bad:
        inner: Cfg = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="inner: .* has no flag type"):
        schema.build_parser(Bad)

    @dataclass
    class Fine:
        inner: Cfg = schema.arg(None, cli=False)
        parsed: Cfg = schema.arg(None, type=lambda text: Cfg(Path(text), [], 0, "raw"))

    assert schema.config_from(Fine, schema.parse(schema.build_parser(Fine), ["--parsed", "p"])).parsed.out_dir == Path("p")


"""Command-line plumbing shared by every script: YAML defaults, then flags, then a typed config.

A script builds its argparse parser, then calls `parse_args(parser, argv)`:
``--config file.yaml`` sets defaults (keys are the flags' dest names; an unknown key is an error that
names it), flags given on the command line override them. `to_config` turns the namespace into the
package's dataclass config, and `save_resolved` writes what was actually used next to the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of defaults (keys = flag names with underscores); flags override it")


def load_yaml_defaults(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({e})")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in data if k.replace("-", "_") not in known)
    if unknown:
        parser.error(f"--config {path}: unknown key(s) {', '.join(unknown)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with YAML defaults from ``--config`` (adds the flag when the parser lacks it)."""
    if not any(a.dest == "config" for a in parser._actions):
        add_config_flag(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        defaults = load_yaml_defaults(known.config, parser)
        # YAML values go through the same type conversion as flags would (paths, tuples of ints ...)
        for action in parser._actions:
            if action.dest in defaults and action.type is not None and defaults[action.dest] is not None:
                v = defaults[action.dest]
                defaults[action.dest] = [action.type(x) for x in v] if isinstance(v, list) else action.type(v)
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def to_config(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build dataclass `cls` from the namespace fields it declares (extra namespace entries are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**values)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, argparse.Namespace):
        return {k: _jsonable(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def resolved(config: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a dataclass config or namespace."""
    return _jsonable(config)


def save_resolved(config: Any, path: Path) -> Path:
    """Write the resolved config as YAML (``.yaml``/``.yml``) or JSON next to the outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = resolved(config)
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
    path.write_text(text)
    return path


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

"""The flags of every script, frozen: `tests/data/cli_snapshot.json` records each argparse action of each
script's `build_parser()` (option strings, dest, default, type, nargs, choices, required, const, action
class; not the help text), and this test compares today's parsers against it. It is the proof that moving
the defaults into the job dataclasses (ctcore.schema) changed no flag, no spelling and no default.

Scripts are found in scripts/ and benchmarks/ and keyed by file stem, so a script may move between the two
folders. The parser is taken as `parse_args` uses it: `--config` is added when build_parser lacks it.

A new script is added with ``--add-new`` (the entries already there stay as they are); ``--regenerate``
rewrites every entry, for a deliberate flag change only:

    .venv/bin/python tests/test_cli_schema.py --add-new
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "cli_snapshot.json"
FOLDERS = ("scripts", "benchmarks")


def script_modules() -> dict[str, str]:
    """File stem -> module name of every scripts/*.py and benchmarks/*.py (first folder wins)."""
    found: dict[str, str] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            if path.stem != "__init__":
                found.setdefault(path.stem, f"{folder}.{path.stem}")
    return found


def _norm(value: Any) -> Any:
    """Paths as str (the checkout's own folder as <root>), tuples as lists, recursively."""
    if isinstance(value, (Path, str)):
        text = str(value)
        return "<root>" + text[len(str(ROOT)):] if text.startswith(str(ROOT) + "/") else text
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    return value


def _type_name(t: Any) -> str | None:
    return None if t is None else getattr(t, "__name__", type(t).__name__)


def describe_action(action: argparse.Action) -> dict[str, Any]:
    return {
        "option_strings": sorted(action.option_strings),
        "dest": action.dest,
        "default": repr(_norm(action.default)),  # repr: 1 and 1.0, "1" and 1 stay apart
        "type": _type_name(action.type),
        "nargs": action.nargs,
        "choices": None if action.choices is None else repr(_norm(list(action.choices))),
        "required": bool(action.required),
        "const": repr(_norm(action.const)),
        "action": type(action).__name__,
    }


def describe_parser(parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """dest -> action description (sorted option strings break a tie of two actions on one dest)."""
    from ctcore.cli import add_config_flag

    if "--config" not in parser._option_string_actions:
        add_config_flag(parser)  # ctcore.cli.parse_args adds it to every script
    out: dict[str, dict[str, Any]] = {}
    for action in parser._actions:
        key = action.dest if action.dest not in out else f"{action.dest}#{'|'.join(sorted(action.option_strings))}"
        out[key] = describe_action(action)
    return out


def current_snapshot() -> dict[str, dict[str, dict[str, Any]]]:
    """Every script with a build_parser, keyed by file stem."""
    snap = {}
    for stem, module in script_modules().items():
        mod = importlib.import_module(module)
        if hasattr(mod, "build_parser"):
            snap[stem] = describe_parser(mod.build_parser())
    return snap


def regenerate(path: Path = SNAPSHOT, only_new: bool = False) -> Path:
    """Write the snapshot of today's parsers; only_new: add scripts it lacks, keep every entry it has."""
    snap = current_snapshot()
    if only_new and path.is_file():
        snap.update(json.loads(path.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return path


def _snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else {}


def _differences(stem: str, want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    lines = [f"{stem}: {dest} is gone" for dest in sorted(set(want) - set(got))]
    lines += [f"{stem}: {dest} is new" for dest in sorted(set(got) - set(want))]
    for dest in sorted(set(want) & set(got)):
        lines += [f"{stem}: {dest}.{k}: {want[dest][k]!r} -> {got[dest].get(k)!r}"
                  for k in sorted(want[dest]) if want[dest][k] != got[dest].get(k)]
    return lines


@pytest.mark.parametrize("stem", sorted(_snapshot()))
def test_flags_match_the_snapshot(stem):
    modules = script_modules()
    assert stem in modules, f"{stem}.py is in neither {' nor '.join(FOLDERS)}/"
    parser = importlib.import_module(modules[stem]).build_parser()
    want = _snapshot()[stem]
    assert _differences(stem, want, describe_parser(parser)) == []


def test_every_script_parser_is_in_the_snapshot():
    assert SNAPSHOT.is_file(), f"{SNAPSHOT} is missing"
    snap = _snapshot()
    new = [stem for stem, module in script_modules().items()
           if stem not in snap and hasattr(importlib.import_module(module), "build_parser")]
    assert new == [], f"scripts without a snapshot entry (add them: python tests/{Path(__file__).name} --add-new)"


def test_the_description_sees_what_matters():
    """Defaults are compared by repr of the normalised value; help is left out."""
    a, b = argparse.ArgumentParser(), argparse.ArgumentParser()
    a.add_argument("--x", type=float, default=1.0, help="one")
    b.add_argument("--x", type=float, default=1, help="two")
    assert _differences("t", describe_parser(a), describe_parser(b)) == ["t: x.default: '1.0' -> '1'"]
    a.add_argument("--p", type=Path, default=Path("out"), nargs="+")
    b.add_argument("--p", type=Path, default=("out",), nargs="+")
    assert describe_parser(a)["p"]["default"] == "'out'" and describe_parser(b)["p"]["default"] == "['out']"


if __name__ == "__main__":
    if sys.argv[1:] not in (["--regenerate"], ["--add-new"]):
        sys.exit(f"usage: python {sys.argv[0]} --regenerate | --add-new")
    sys.path.insert(0, str(ROOT))
    print(f"wrote {regenerate(only_new=sys.argv[1] == '--add-new')}")

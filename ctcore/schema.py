"""One schema per setting: a job's dataclass field holds its default, its help and the shape of its flag.

    @dataclass
    class EvalConfig:
        predictions: Path = arg(help="ID,Label CSV of probabilities", flags=("-p",))  # no default: required
        group_column: str = arg("StudyInstanceUID", help="the column that groups slices")
        n_bootstrap: int = arg(1000, help="bootstrap resamples (0 = no intervals)")
        progress: bool = arg(True, action="store_false")                     # --no_progress

    def build_parser():                      # in scripts/X.py
        return schema.build_parser(EvalConfig, description=__doc__)

    def main(argv=None):
        return run_main(EvalConfig, run_eval, argv, parser=build_parser(), name="hemorrhage_eval",
                        report=lambda summary, cfg: print(summary.line()))

`build_parser` adds one flag per field: ``--<field>`` (dest = the field name), its type from the annotation
(int, float, Path; str and anything else untyped; ``X | None`` as X; ``list[X]``/``tuple[X, ...]``/``dict``
as nargs "+"; ``tuple[X, X, X]`` as nargs 3; ``Literal[...]`` as choices), a bool defaulting to False as
``store_true`` and one defaulting to True as ``--X/--no-X`` (argparse.BooleanOptionalAction); a field
without a default is a required flag. `arg(...)` metadata overrides any of it; fields with ``cli=False``
get no flag. Then ``--verbose`` (unless ``verbose=False``) and ``--config`` (YAML defaults, keys = dest
names, ctcore.cli.parse_args). `config_from` turns the parsed namespace into the dataclass (lists back to
tuples where the field is a tuple), and `run_main` is every script's main: parse -> logging -> config(s)
-> job -> report, the job's "cannot run as asked" errors logged once and mapped to an exit status.

Libraries that derive parsers from dataclasses (tyro, simple-parsing, jsonargparse) were not used: none
keeps all of this project's spellings without fighting it (underscored flags with short aliases,
``store_true`` flags without a ``--no-`` twin beside ``--X/--no-X`` pairs and ``--no_progress`` store_false
flags, and a ``--config`` whose YAML keys are dest names that the flags override).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ctcore.cli import add_config_flag, parse_args, setup_logging
from ctcore.errors import UsageError

T = TypeVar("T")
KEY = "ctcore.schema"  # the dataclass field metadata key of an ArgSpec
_UNSET: Any = object()
_TYPED = (int, float, Path)  # element types given to argparse as type=; str and the rest stay untyped


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """How a field appears on the command line (see `arg`)."""

    help: str = ""
    flags: tuple[str, ...] = ()
    name: str | None = None
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    action: Any = None
    required: bool | None = None
    needed: bool = False
    cli_default: Any = _UNSET
    cli: bool = True


def arg(default: Any = dataclasses.MISSING, *, help: str = "", flags: Sequence[str] = (),
        name: str | None = None, choices: Sequence[Any] | None = None, type: Callable[[str], Any] | None = None,
        nargs: int | str | None = None, metavar: str | tuple[str, ...] | None = None, action: Any = None,
        required: bool | None = None, needed: bool = False, cli_default: Any = _UNSET, cli: bool = True,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its flag in the metadata.

    flags: more option strings (short aliases, old spellings); name: replaces ``--<field>`` (a store_false
    field is ``--no_<field>`` unless named); required: a required flag although the field has a default (for
    calls from code); needed: the flag must be given on the command line or in --config (its parser default
    is None; `parse` names it when missing); cli_default: the parser's default when it differs from the
    field's (None here means "not given: the field keeps its default"); cli=False: no flag at all.
    """
    spec = ArgSpec(help=help, flags=tuple(flags), name=name, choices=choices, type=type, nargs=nargs,
                   metavar=metavar, action=action, required=required, needed=needed, cli_default=cli_default,
                   cli=cli)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={KEY: spec})


def spec_of(f: dataclasses.Field) -> ArgSpec:
    return f.metadata.get(KEY, ArgSpec())


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shape(hint: Any) -> dict[str, Any]:
    """type / nargs / choices that the annotation implies."""
    hint = _strip_optional(hint)
    origin, args = get_origin(hint), get_args(hint)
    out: dict[str, Any] = {}
    elem = hint
    if origin in (list, tuple, Sequence, set, frozenset):
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        out["nargs"] = len(args) if fixed else "+"
        elem = args[0] if args else str
    elif origin in (dict, Mapping):
        out["nargs"], elem = "+", str
    elif origin is Literal:
        out["choices"], elem = list(args), type(args[0])
    if elem in _TYPED:
        out["type"] = elem
    elif elem is not str:
        out["type"] = _UNSET  # no flag type for it: the field needs type= (or cli=False)
    return out


def flag_options(f: dataclasses.Field, hint: Any) -> tuple[list[str], dict[str, Any]]:
    """The option strings and add_argument keywords of one field."""
    spec, default = spec_of(f), _field_default(f)
    action = spec.action
    if action is None and _strip_optional(hint) is bool:
        action = "store_true" if default is False else argparse.BooleanOptionalAction
    name = spec.name or (f"--no_{f.name}" if action == "store_false" else f"--{f.name}")
    kw: dict[str, Any] = {"dest": f.name, "help": spec.help or None}
    if action is not None:
        kw["action"] = action
    if action not in ("store_true", "store_false", argparse.BooleanOptionalAction):
        kw.update(_shape(hint))
        for key in ("type", "nargs", "choices", "metavar"):
            if getattr(spec, key) is not None:
                kw[key] = getattr(spec, key)
        if kw.get("type") is _UNSET:
            raise TypeError(f"{f.name}: {hint} has no flag type; give arg(type=...) or arg(cli=False)")
    required = spec.required if spec.required is not None else default is dataclasses.MISSING
    if required:
        kw["required"] = True
    elif spec.needed:
        kw["default"] = None
    else:
        kw["default"] = default if spec.cli_default is _UNSET else spec.cli_default
    return [name, *spec.flags], kw


def add_arguments(parser: argparse._ActionsContainer, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per field of dataclass `cls` (but `skip`, cli=False fields and dests already there)."""
    hints = get_type_hints(cls)
    have = {a.dest for a in parser._actions}
    for f in dataclasses.fields(cls):
        if not f.init or not spec_of(f).cli or f.name in skip or f.name in have:
            continue
        names, kw = flag_options(f, hints[f.name])
        parser.add_argument(*names, **kw)


def build_parser(*classes: type, description: str | None = None, verbose: bool = True,
                 formatter_class: type = argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """A parser with the flags of every dataclass in `classes`, then --verbose and --config."""
    p = argparse.ArgumentParser(description=description, formatter_class=formatter_class)
    for cls in classes:
        add_arguments(p, cls)
    if verbose and "--verbose" not in p._option_string_actions:
        p.add_argument("--verbose", action="store_true", help="debug logging")
    if "--config" not in p._option_string_actions:
        add_config_flag(p)
    return p


def needed_fields(classes: Sequence[type]) -> dict[str, str]:
    """dest -> flag of the fields declared `needed`."""
    out = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if spec_of(f).needed:
                out[f.name] = spec_of(f).name or f"--{f.name}"
    return out


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, classes: Sequence[type] = ()
          ) -> argparse.Namespace:
    """ctcore.cli.parse_args, then the `needed` flags of `classes` checked (given by flag or --config)."""
    ns = parse_args(parser, argv)
    for dest, flag in needed_fields(classes).items():
        if getattr(ns, dest, None) is None:
            parser.error(f"{flag} is required (on the command line or in --config)")
    return ns


def _coerce(value: Any, hint: Any) -> Any:
    if isinstance(value, list) and get_origin(_strip_optional(hint)) is tuple:
        return tuple(value)
    return value


def config_from(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Dataclass `cls` from the namespace entries of its flagged fields (others keep their defaults)."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = spec_of(f)
        if not f.init or not spec.cli or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if value is None and spec.cli_default is None:
            continue  # "not given" on a flag whose parser default stands for the field's own
        values[f.name] = _coerce(value, hints[f.name])
    values.update(overrides)
    return cls(**values)


Errors = tuple[type[BaseException], ...] | Mapping[type[BaseException], int]


def run_main(configs: type | Sequence[type], job: Callable[..., Any], argv: list[str] | None = None, *,
             name: str, parser: argparse.ArgumentParser | None = None, description: str | None = None,
             errors: Errors = (UsageError,), usage_errors: tuple[type[BaseException], ...] = (),
             report: Callable[..., int | None] | None = None, verbose: bool = True) -> int:
    """parse -> setup_logging -> one config per class -> ``job(*configs)`` -> ``report(result, *configs)``.

    `errors` (exception classes -> exit status 2, or a mapping class -> status) raised while building the
    configs or running the job are logged once under logger `name`; `usage_errors` are reported as a bad flag
    would be (usage line + message on stderr, SystemExit 2). `report` prints the summary and may return the
    exit status (None = 0). `parser` defaults to `build_parser(*configs, description=...)`.
    """
    classes = tuple(configs) if isinstance(configs, Sequence) else (configs,)
    codes = dict(errors) if isinstance(errors, Mapping) else dict.fromkeys(errors, 2)
    parser = parser or build_parser(*classes, description=description, verbose=verbose)
    ns = parse(parser, argv, classes)
    setup_logging(bool(getattr(ns, "verbose", False)))
    try:
        cfgs = [config_from(cls, ns) for cls in classes]
        result = job(*cfgs)
    except (*usage_errors, *codes) as e:
        if isinstance(e, usage_errors):
            parser.error(str(e))
        logging.getLogger(name).error("%s", e)
        return next(code for cls, code in codes.items() if isinstance(e, cls))
    code = report(result, *cfgs) if report is not None else None
    return 0 if code is None else int(code)


def print_capped(lines: Sequence[str], rest_in: Any, limit: int = 20) -> None:
    """A report's list of problems: the first `limit` lines, then ``  ... and N more in <rest_in>``."""
    for line in lines[:limit]:
        print(line)
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more in {rest_in}")


__all__ = ["ArgSpec", "add_arguments", "arg", "build_parser", "config_from", "flag_options", "parse",
           "print_capped", "run_main", "spec_of"]

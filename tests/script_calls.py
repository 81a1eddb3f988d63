"""Finding the project's script calls in shell text (job scripts, README code blocks, the Makefile) and
checking their flags against each script's own argparse parser, so that renaming a flag breaks a test
instead of a user's job. Used by tests/test_cluster.py and tests/test_docs_commands.py.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

from ctcore.cli import add_config_flag

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"


def logical_lines(text: str, comments: bool) -> list[str]:
    """Shell code lines (comments=False) or the text of comment lines (True), continuations joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") != comments:
            continue
        if comments:
            line = line.lstrip("#").strip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return [*out, current] if current else out


def _tokens(line: str) -> list[str]:
    """Shell words; ';', '&' and '|' are words of their own even when glued to one ("out.csv;")."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes in prose
        return line.split()


_SCRIPT = re.compile(r"(?:^|/)(scripts|benchmarks)/(\w+)\.py$")
_JOB = re.compile(r"(?:^|/)scripts/slurm/(\w+\.(?:sbatch|sh))$")
_STOP = {"|", "||", "&&", ";", "&"}


def invocations(line: str) -> list[tuple[str, str, list[str], bool]]:
    """(kind, target, flags, passes "$@") for every `scripts/X.py`, `benchmarks/X.py`, `-m torch.distributed.run` and
    `scripts/slurm/X.sbatch` on a logical line; flags are the option tokens that follow it."""
    toks = [t if t in _STOP else t.rstrip(");") for t in _tokens(line)]
    found = []
    for i, tok in enumerate(toks):
        if m := _SCRIPT.search(tok):  # target: X for scripts/X.py, benchmarks/X for benchmarks/X.py
            kind, target = "script", m.group(2) if m.group(1) == "scripts" else f"benchmarks/{m.group(2)}"
        elif m := _JOB.search(tok):
            kind, target = "job", m.group(1)
        elif tok == "torch.distributed.run" and i > 0 and toks[i - 1] == "-m":
            kind, target = "torchrun", tok
        else:
            continue
        flags, passes_all = [], False
        for t in toks[i + 1:]:
            if t in _STOP or t.startswith((">", "2>")) or _SCRIPT.search(t):
                break
            passes_all |= t == "$@"
            if t.startswith("-") and t not in ("-", "--") and not re.fullmatch(r"-[\d.]+", t):
                flags.append(t.split("=", 1)[0])
        found.append((kind, target, flags, passes_all))
    return found


def _options(target: str) -> set[str]:
    if target == "torch.distributed.run":
        from torch.distributed.run import get_args_parser

        return set(get_args_parser()._option_string_actions)
    folder, name = target.split("/") if "/" in target else ("scripts", target)
    assert (ROOT / folder / f"{name}.py").is_file(), f"{folder}/{name}.py does not exist"
    parser = importlib.import_module(f"{folder}.{name}").build_parser()
    if "--config" not in parser._option_string_actions:
        add_config_flag(parser)  # ctcore.cli.parse_args adds it to every script
    return set(parser._option_string_actions)


def _job_target(job: str) -> str:
    """The script a job file hands "$@" to."""
    targets = [t for line in logical_lines((SLURM / job).read_text(), comments=False)
               for kind, t, _, passes_all in invocations(line) if passes_all and kind == "script"]
    assert len(targets) == 1, f"{job}: expected one scripts/X.py ... \"$@\", found {targets}"
    return targets[0]


def bad_flags(lines: list[str]) -> list[str]:
    problems = []
    for line in lines:
        for kind, target, flags, _ in invocations(line):
            if kind == "job":
                assert (SLURM / target).is_file(), f"scripts/slurm/{target} does not exist: {line}"
                if target.endswith(".sh"):
                    continue
                target = _job_target(target)
            known = _options(target)
            problems += [f"{target}: {flag} (in: {line[:120]})" for flag in flags if flag not in known]
    return problems

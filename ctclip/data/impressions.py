"""The library half of scripts/ctclip_impressions.py (the job: `ctclip.run.impressions`): which reports
need an impression, few-shot examples, prompts, cleaning a generation, and the JSON Lines records file
that a killed run resumes from.

Few-shot examples come from complete reports at evenly spaced quantiles of findings length, never
from the same scan as the target nor with the same findings text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from ctclip.data.splits import VOLUME_RE
from ctcore.errors import UsageError

log = logging.getLogger(__name__)

PROMPT_STYLES = ("auto", "chat", "plain")
INSTRUCTION = ("You are an experienced radiologist. Write the Impression section of a chest CT report from its "
               "Findings section: a concise summary of the clinically relevant findings, in the style of the "
               "examples. Answer with the impression text only.")
SEPARATOR = "###"
_LEADING_LABEL = re.compile(r"^\s*(?:\*\*)?\s*impressions?\s*(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)
_NEXT_SECTION = re.compile(r"###|\b(?:findings|impressions?|clinical information|technique)\s*:", re.IGNORECASE)


class ImpressionError(UsageError):
    """The run cannot start or continue: bad inputs, or an output file that belongs to another model."""

@dataclass(frozen=True)
class Report:
    volume_name: str
    findings: str
    impression: str = ""


def scan_key(volume_name: str) -> str:
    """``<split>_<pid>_<scan>``: reconstructions of one scan share one report."""
    m = VOLUME_RE.match(volume_name)
    return f"{m['split']}_{m['pid']}_{m['scan']}" if m else volume_name


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def find_targets(reports: pd.DataFrame) -> tuple[list[Report], list[Report]]:
    """Reports lacking an impression: (those with findings to complete, those without findings)."""
    missing = reports[reports["Impressions_EN"] == ""]
    rows = [Report(v, f) for v, f in zip(missing["VolumeName"], missing["Findings_EN"])]
    return [r for r in rows if r.findings], [r for r in rows if not r.findings]


class ExamplePool:
    """Complete reports sorted by (findings length, VolumeName), with look-ups for what a target excludes."""

    def __init__(self, reports: pd.DataFrame) -> None:
        complete = reports[(reports["Findings_EN"] != "") & (reports["Impressions_EN"] != "")]
        rows = [Report(v, f, i) for v, f, i in zip(complete["VolumeName"], complete["Findings_EN"], complete["Impressions_EN"])]
        self.reports = sorted(rows, key=lambda r: (len(r.findings), r.volume_name))
        self._by_scan: dict[str, list[int]] = defaultdict(list)
        self._by_text: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.reports):
            self._by_scan[scan_key(r.volume_name)].append(i)
            self._by_text[_norm(r.findings)].append(i)

    def __len__(self) -> int:
        return len(self.reports)

    def select(self, target: Report, k: int) -> list[Report]:
        """`k` examples at evenly spaced length quantiles of the pool, leaving out the target's own
        scan (which covers its VolumeName) and reports with the same findings text; shortest first."""
        excluded = sorted(set(self._by_scan.get(scan_key(target.volume_name), []))
                          | set(self._by_text.get(_norm(target.findings), [])))
        available = len(self.reports) - len(excluded)
        k = min(k, available)
        if k <= 0:
            return []
        if k == 1:
            ranks = [(available - 1) // 2]
        else:
            ranks = [math.floor(i * (available - 1) / (k - 1) + 0.5) for i in range(k)]
        # rank r among the non-excluded reports -> position in the full pool, without copying the pool
        picked = []
        for rank in ranks:
            pos = rank
            for e in excluded:
                if e > pos:
                    break
                pos += 1
            picked.append(self.reports[pos])
        return picked


def resolve_prompt_style(style: str, tokenizer: Any, model: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat" if has_template else "plain"
    if style == "chat" and not has_template:
        raise ImpressionError(f"--prompt_style chat: the tokenizer of {model!r} has no chat template; "
                              "use --prompt_style plain (or auto)")
    return style


def build_prompt(examples: list[Report], target: Report, style: str, tokenizer: Any = None) -> str:
    if style == "plain":
        blocks = [f"Findings: {e.findings}\nImpression: {e.impression}" for e in examples]
        blocks.append(f"Findings: {target.findings}\nImpression:")
        return INSTRUCTION + "\n\n" + f"\n\n{SEPARATOR}\n\n".join(blocks)
    turns: list[dict[str, str]] = []
    for e in examples:
        turns += [{"role": "user", "content": f"Findings: {e.findings}"}, {"role": "assistant", "content": e.impression}]
    turns.append({"role": "user", "content": f"Findings: {target.findings}"})
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": INSTRUCTION}, *turns],
                                             tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError:
        # some templates (Gemma, Mistral) reject a system turn: the instruction leads the first user turn
        turns[0] = {"role": "user", "content": f"{INSTRUCTION}\n\n{turns[0]['content']}"}
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def fit_prompt(examples: list[Report], target: Report, build: Callable[[list[Report]], str],
               count: Callable[[str], int], max_length: int | None,
               max_new_tokens: int) -> tuple[str, list[Report], int] | None:
    """(prompt, examples kept, prompt tokens) with as many examples as fit the context (the longest
    go first); None when even the target alone does not fit."""
    kept = list(examples)
    while True:
        prompt = build(kept)
        n_tokens = count(prompt)
        if max_length is None or n_tokens + max_new_tokens <= max_length:
            if len(kept) < len(examples):
                log.info("%s: dropped %d longest example(s) so that the prompt + %d new tokens fit the %d-token context",
                         target.volume_name, len(examples) - len(kept), max_new_tokens, max_length)
            return prompt, kept, n_tokens
        if not kept:
            return None
        kept.remove(max(kept, key=lambda r: (len(r.findings) + len(r.impression), r.volume_name)))


def clean_generation(text: str) -> str:
    """The impression alone: a leading "Impression:" label removed, cut where a next section or example begins."""
    text = _LEADING_LABEL.sub("", text, count=1)
    m = _NEXT_SECTION.search(text)
    return (text[:m.start()] if m else text).strip()


def read_records(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Records of an output file by VolumeName, and the byte length of its valid part (a last line
    cut by a kill is left out, to be redone). Any other unreadable line is an error."""
    if not path.exists():
        return {}, 0
    data = path.read_bytes()
    records: dict[str, dict[str, Any]] = {}
    good = 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines, 1):
        end = good + len(line) + (1 if n < len(lines) else 0)
        if line.strip():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not {"VolumeName", "generated", "model"} <= rec.keys():
                    raise ValueError("not an impression record")
            except ValueError as e:
                if any(rest.strip() for rest in lines[n:]):
                    raise ImpressionError(f"{path}: line {n} is not a valid record ({e}); fix or remove it") from e
                log.warning("%s: last line %d is incomplete (an interrupted run); it will be redone", path, n)
                return records, good
            records[rec["VolumeName"]] = rec
        good = end
    return records, len(data)


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Append and make durable: after this returns, a kill cannot lose these rows."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(path: Path, valid_bytes: int) -> None:
    """Cut an incomplete last line, and end the file with a newline, so appended records start on their own line."""
    if not path.exists():
        return
    if valid_bytes < path.stat().st_size:
        os.truncate(path, valid_bytes)
    if valid_bytes:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def open_output(path: Path, model: str) -> dict[str, dict[str, Any]]:
    """The records already in `path` (after repairing a cut last line); refuses another model's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done, valid_bytes = read_records(path)
    others = sorted({r["model"] for r in done.values()} - {model})
    if others:
        raise ImpressionError(f"{path} holds impressions from model {', '.join(others)}, not {model}: "
                              "one output file per model; choose another --output_file")
    _repair_tail(path, valid_bytes)
    return done

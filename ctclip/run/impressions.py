r"""Complete missing report impressions with a causal LLM (seed: impression_section.py).

    # any local Hugging Face causal LM, CPU or GPU
    python scripts/ctclip_impressions.py --target_file data/validation_reports.csv \
        --output_file completed_reports.jsonl --num_examples 8 --model /models/Qwen2.5-7B-Instruct
    # vLLM offline engine on GPU (uv sync --extra llm), then a completed CSV
    python scripts/ctclip_impressions.py --backend vllm --model /models/Qwen2.5-7B-Instruct \
        --target_file data/validation_reports.csv --output_file completed_reports.jsonl \
        --merge_into data/validation_reports_completed.csv

A report needs an impression when its Impressions_EN is empty (NaN, "", "Not given."); it can get one
only when its Findings_EN is not empty (the others are skipped and named in <output>.errors.csv).
Few-shot examples come from complete reports at evenly spaced quantiles of findings length, never
from the same scan as the target nor with the same findings text. Output is JSON Lines, appended and
fsync'ed per batch: a killed run is re-run with the same command and continues where it stopped.
Targets, examples, prompts and the records file are in `ctclip.data.impressions`; this module is the job.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ctclip.data.impressions import (
    PROMPT_STYLES,
    ExamplePool,
    ImpressionError,
    Report,
    append_records,
    build_prompt,
    clean_generation,
    find_targets,
    fit_prompt,
    open_output,
    read_records,
    resolve_prompt_style,
)
from ctclip.data.reports import clean_section, load_reports
from ctclip.run.impressions_backends import BACKENDS, Backend, GenerationSettings, load_backend
from ctcore.atomic import atomic_write
from ctcore.cli import save_resolved
from ctcore.schema import arg

log = logging.getLogger(__name__)

SOURCE_COLUMN = "Impressions_source"


@dataclass
class ImpressionConfig:
    target_file: Path = arg(help="CT-RATE reports CSV (VolumeName, ClinicalInformation_EN, Technique_EN, "
                                 "Findings_EN, Impressions_EN)")
    output_file: Path = arg(help="JSON Lines of generated impressions (appended; resumable)")
    model: str | None = arg(None, help="local model folder, or a name already in the Hugging Face cache (never "
                                       "downloaded)")
    num_examples: int = arg(8, help="few-shot examples per prompt, drawn from complete reports")
    backend: str = arg("transformers", choices=BACKENDS)
    batch_size: int = arg(16, help="prompts per generate call; records are written after each")
    max_new_tokens: int = 256
    temperature: float = arg(0.0, help="0 = greedy")
    top_p: float = arg(1.0, help="nucleus sampling (with --temperature > 0)")
    seed: int = 42
    prompt_style: str = arg("auto", choices=PROMPT_STYLES,
                            help="chat: the tokenizer's chat template; plain: a text completion prompt; auto: "
                                 "chat when there is a template")
    examples_file: Path | None = arg(None, help="reports CSV to draw examples from (default: --target_file)")
    merge_into: Path | None = arg(None, help="write the target CSV with missing impressions filled in and an "
                                             "Impressions_source column")
    limit: int | None = arg(None, help="generate at most this many reports in this run")
    device: str | None = arg(None, help="transformers backend: cpu, cuda, cuda:1 ... (default: cuda when "
                                        "available)")
    max_model_len: int | None = arg(None, help="context length in tokens (default: the model's own)")
    tensor_parallel_size: int = arg(1, help="vllm backend: GPUs per model")

    def __post_init__(self) -> None:
        self.target_file, self.output_file = Path(self.target_file), Path(self.output_file)
        self.examples_file = None if self.examples_file is None else Path(self.examples_file)
        self.merge_into = None if self.merge_into is None else Path(self.merge_into)
        problems = [msg for bad, msg in [
            (not self.model, "--model is required (a local model folder, or a name in the Hugging Face cache)"),
            (self.backend not in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}"),
            (self.prompt_style not in PROMPT_STYLES, f"--prompt_style must be one of {', '.join(PROMPT_STYLES)}"),
            (self.num_examples < 0, "--num_examples must be >= 0"),
            (self.batch_size < 1, "--batch_size must be >= 1"),
            (self.max_new_tokens < 1, "--max_new_tokens must be >= 1"),
            (self.temperature < 0, "--temperature must be >= 0 (0 = greedy)"),
            (self.limit is not None and self.limit < 0, "--limit must be >= 0"),
            (self.merge_into is not None and self.merge_into.resolve() == self.target_file.resolve(),
             "--merge_into must not be the --target_file (the original stays as it is)"),
        ] if bad]
        if problems:
            raise ImpressionError("; ".join(problems))

    def settings(self) -> GenerationSettings:
        return GenerationSettings(self.max_new_tokens, self.temperature, self.top_p, self.seed)


def model_label(model: str) -> str:
    """How a model is named in records: a local folder by its absolute path, otherwise the name given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    atomic_write(path, write)


def merge_impressions(target_file: Path, records: dict[str, dict[str, Any]], out: Path) -> dict[str, int]:
    """The reports CSV with empty impressions filled from `records` and a provenance column; every
    other cell is written back exactly as read."""
    raw = pd.read_csv(target_file, dtype=str, keep_default_na=False)
    has_original = raw["Impressions_EN"].map(clean_section) != ""
    generated = raw["VolumeName"].map(lambda v: records.get(v, {}).get("generated", ""))
    fill = ~has_original & (generated != "")
    source = pd.Series(np.where(has_original, "original", "missing"), index=raw.index, dtype=object)
    if SOURCE_COLUMN in raw.columns:  # merging an already merged file keeps what it says about its rows
        source = raw[SOURCE_COLUMN].where(has_original & (raw[SOURCE_COLUMN] != ""), source)
    source[fill] = [f"generated:{records[v]['model']}" for v in raw.loc[fill, "VolumeName"]]
    merged = raw.copy()
    merged.loc[fill, "Impressions_EN"] = generated[fill]
    merged[SOURCE_COLUMN] = source
    _write_atomic(out, lambda tmp: merged.to_csv(tmp, index=False))
    counts = {"original": int(has_original.sum()), "generated": int(fill.sum()),
              "missing": int((~has_original & ~fill).sum())}
    log.info("merged %s -> %s: %s", target_file, out, counts)
    return counts


def _load_table(path: Path, what: str) -> pd.DataFrame:
    df = load_reports(path)
    if df.empty:
        raise ImpressionError(f"{what} {path}: the CSV has no rows")
    return df


def _sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.with_suffix("").name + suffix)


def _record(target: Report, prompt: str, examples: list[Report], raw: str, cfg: ImpressionConfig,
            model: str, style: str, prompt_tokens: int) -> dict[str, Any]:
    return {"VolumeName": target.volume_name, "generated": clean_generation(raw), "raw": raw,
            "model": model, "backend": cfg.backend,
            "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest(), "prompt": prompt,
            "prompt_style": style, "prompt_tokens": prompt_tokens, "examples": [e.volume_name for e in examples],
            "settings": {**asdict(cfg.settings()), "num_examples": cfg.num_examples},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _generate(pending: list[Report], pool: ExamplePool, backend: Backend, cfg: ImpressionConfig,
              model: str) -> tuple[int, list[tuple[str, str]], int]:
    """Generate and append records for `pending`; returns (records written, failures, rows with trimmed examples)."""
    style = resolve_prompt_style(cfg.prompt_style, backend.tokenizer, model)
    special = style == "plain"  # a chat template already holds the model's special tokens
    log.info("prompt style %s, %d example(s) per prompt from %d complete reports", style, cfg.num_examples, len(pool))
    written, failed, trimmed = 0, [], 0
    with logging_redirect_tqdm(), tqdm(total=len(pending), desc="impressions", unit="report") as bar:
        for start in range(0, len(pending), cfg.batch_size):
            batch = []
            for target in pending[start:start + cfg.batch_size]:
                examples = pool.select(target, cfg.num_examples)
                fitted = fit_prompt(examples, target, lambda ex, t=target: build_prompt(ex, t, style, backend.tokenizer),
                                    lambda p: backend.count_tokens(p, special), backend.max_length, cfg.max_new_tokens)
                if fitted is None:
                    failed.append((target.volume_name, f"findings alone exceed the {backend.max_length}-token context "
                                                       f"with --max_new_tokens {cfg.max_new_tokens}"))
                    continue
                trimmed += len(fitted[1]) < len(examples)
                batch.append((target, *fitted))
            if batch:
                outputs = backend.generate([p for _, p, _, _ in batch], special)
                append_records(cfg.output_file, [_record(t, p, ex, out, cfg, model, style, n)
                                                 for (t, p, ex, n), out in zip(batch, outputs)])
                written += len(batch)
            bar.update(min(cfg.batch_size, len(pending) - start))
    return written, failed, trimmed


def complete_impressions(cfg: ImpressionConfig) -> dict[str, Any]:
    """Generate the missing impressions of `cfg.target_file` into `cfg.output_file` (resuming), then
    optionally merge them into a completed CSV. Returns the summary (also written as <output>.summary.json)."""
    t0 = time.time()
    reports = _load_table(cfg.target_file, "reports CSV")
    pool = ExamplePool(_load_table(cfg.examples_file, "examples CSV") if cfg.examples_file else reports)
    if cfg.num_examples > 0 and len(pool) == 0:
        raise ImpressionError(f"{cfg.examples_file or cfg.target_file}: no complete report (findings and impression) "
                              "to draw few-shot examples from; give --examples_file, or --num_examples 0")
    targets, no_findings = find_targets(reports)
    model = model_label(cfg.model)
    done = open_output(cfg.output_file, model)
    save_resolved(cfg, _sidecar(cfg.output_file, ".config.yaml"))

    pending = [t for t in targets if t.volume_name not in done]
    run = pending if cfg.limit is None else pending[:cfg.limit]
    written, failed, trimmed = 0, [], 0
    if run:  # the model is loaded only when there is something to generate
        backend = load_backend(cfg.backend, cfg.model, cfg.settings(), device=cfg.device,
                               max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size)
        written, failed, trimmed = _generate(run, pool, backend, cfg, model)
    records, _ = read_records(cfg.output_file)
    empty = [(t.volume_name, "the model generated an empty impression") for t in targets
             if t.volume_name in records and not records[t.volume_name]["generated"]]
    _report_problems(cfg.output_file, [(r.volume_name, "findings empty: nothing to write an impression from")
                                       for r in no_findings] + failed + empty)

    summary: dict[str, Any] = {
        "target_file": str(cfg.target_file), "output_file": str(cfg.output_file), "model": model,
        "backend": cfg.backend, "reports": len(reports), "missing_impressions": len(targets) + len(no_findings),
        "generated": written, "already_present": len(targets) - len(pending),
        "skipped_no_findings": len(no_findings), "failed": len(failed) + len(empty),
        "left_by_limit": len(pending) - len(run), "examples_pool": len(pool), "examples_trimmed": trimmed,
        "merged_into": None, "merge": None}
    if cfg.merge_into is not None:
        summary["merged_into"] = str(cfg.merge_into)
        summary["merge"] = merge_impressions(cfg.target_file, records, cfg.merge_into)
    summary["seconds"] = round(time.time() - t0, 2)
    _write_atomic(_sidecar(cfg.output_file, ".summary.json"),
                  lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def _report_problems(output: Path, problems: list[tuple[str, str]]) -> None:
    """<output>.errors.csv names every report still without an impression, and why (rewritten each run)."""
    path = _sidecar(output, ".errors.csv")
    _write_atomic(path, lambda tmp: _write_errors(tmp, problems))
    if problems:
        log.warning("%d report(s) left without an impression (%s%s): see %s", len(problems),
                    ", ".join(name for name, _ in problems[:3]), ", ..." if len(problems) > 3 else "", path)


def _write_errors(path: Path, problems: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["VolumeName", "reason"])
        w.writerows(problems)


def summary_line(s: dict[str, Any]) -> str:
    line = (f"impressions: {s['generated']} done, {s['skipped_no_findings']} skipped (no findings), "
            f"{s['already_present']} already present, {s['failed']} failed")
    if s["left_by_limit"]:
        line += f", {s['left_by_limit']} left for a later run (--limit)"
    line += f" -> {s['output_file']}"
    return line + (f"; completed CSV {s['merged_into']}" if s["merged_into"] else "")



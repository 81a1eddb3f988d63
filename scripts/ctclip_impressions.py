r"""Write the missing impressions of CT-RATE reports with an LLM (seed: impression_section.py).

    # any local Hugging Face causal LM (CPU works, slowly; bf16 on GPU)
    python scripts/ctclip_impressions.py --target_file data/validation_reports.csv \
        --output_file completed_reports.jsonl --num_examples 8 --model /models/Qwen2.5-7B-Instruct
    # vLLM offline engine (GPU; uv sync --extra llm), plus a completed reports CSV
    python scripts/ctclip_impressions.py --backend vllm --model /models/Qwen2.5-7B-Instruct \
        --target_file data/validation_reports.csv --output_file completed_reports.jsonl \
        --batch_size 256 --merge_into data/validation_reports_completed.csv

Output: JSON Lines, one record per completed report (VolumeName, generated, model, backend, prompt,
prompt_sha256, settings), written per batch; re-run the same command to resume after a crash.
Beside it: <output>.summary.json, <output>.errors.csv (rows skipped or failed), <output>.config.yaml.
Exit status: 0 done, 2 bad input (missing file or column, another model's output file, model not
loadable), 3 when some rows failed (prompt too long for the context, empty generation).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctclip.data.reports import TableError
from ctclip.run.impressions import (
    PROMPT_STYLES,
    ImpressionConfig,
    ImpressionError,
    complete_impressions,
    summary_line,
)
from ctclip.run.impressions_backends import BACKENDS, BackendError
from ctcore.cli import parse_args, setup_logging, to_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--target_file", type=Path, required=True,
      help="CT-RATE reports CSV (VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN)")
    a("--output_file", type=Path, required=True, help="JSON Lines of generated impressions (appended; resumable)")
    a("--num_examples", type=int, default=8, help="few-shot examples per prompt, drawn from complete reports")
    a("--model", default=None, help="local model folder, or a name already in the Hugging Face cache (never downloaded)")
    a("--backend", choices=BACKENDS, default="transformers")
    a("--batch_size", type=int, default=16, help="prompts per generate call; records are written after each")
    a("--max_new_tokens", type=int, default=256)
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    a("--seed", type=int, default=42)
    a("--prompt_style", choices=PROMPT_STYLES, default="auto",
      help="chat: the tokenizer's chat template; plain: a text completion prompt; auto: chat when there is a template")
    a("--examples_file", type=Path, default=None, help="reports CSV to draw examples from (default: --target_file)")
    a("--merge_into", type=Path, default=None,
      help="write the target CSV with missing impressions filled in and an Impressions_source column")
    a("--limit", type=int, default=None, help="generate at most this many reports in this run")
    a("--device", default=None, help="transformers backend: cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--max_model_len", type=int, default=None, help="context length in tokens (default: the model's own)")
    a("--tensor_parallel_size", type=int, default=1, help="vllm backend: GPUs per model")
    a("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    try:
        summary = complete_impressions(to_config(ImpressionConfig, args))
    except (ImpressionError, BackendError, TableError) as e:
        logging.getLogger("ctclip_impressions").error("%s", e)
        return 2
    print(summary_line(summary))
    return 3 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

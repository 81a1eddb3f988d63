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
import sys

from ctclip.data.reports import TableError
from ctclip.run.impressions import ImpressionConfig, ImpressionError, complete_impressions, summary_line
from ctclip.run.impressions_backends import BackendError
from ctcore import schema


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(ImpressionConfig, description=__doc__)


def report(summary: dict, cfg: ImpressionConfig) -> int:
    print(summary_line(summary))
    return 3 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(ImpressionConfig, complete_impressions, argv, parser=build_parser(),
                           name="ctclip_impressions", errors=(ImpressionError, BackendError, TableError),
                           report=report)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the text tower's sentence pool with the sentences packed into short rows (ours) against the same
pool computed over whole reports under a (B, L, L) sentence mask (the reference), measured in the same run.

    python benchmarks/bench_text_pool.py                  # 32 synthetic CT-RATE reports (findings + impression,
                                                          # ~310 tokens), tiny_cnn's text tower, one thread
    python benchmarks/bench_text_pool.py --reports 64 --model tiny_cnn --threads 2 --json text_pool.json

Both compute the same thing: each sentence of a report is encoded on its own (a token attends to the tokens
of its sentence, positions count from the sentence's start) and the report is the mean of its sentences'
token means. The reference runs the tower over the whole padded report and masks every other sentence out of
the attention: the attention and the mask cost (report length)^2 per report and per head. Ours
(`ctclip.models.text.encode_tokens(..., pool="sentence")`) packs the batch's sentences into rows as long as
the longest sentence, so the attention costs ~(tokens x longest sentence) and padding nearly disappears.

The reports are written by the synthetic generator (`ctclip.synthetic.reports.compose_report`, each finding
present with probability 0.35, as in the learning set). The script first checks that the two give the same
embeddings (max abs difference printed; > 1e-4 is an error), then times --repeats rounds of --steps
training steps each (forward, a scalar loss, backward, AdamW), the two interleaved, as process CPU time
(user + system, all threads) and wall time; medians are reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.step_timer import interleaved, print_table, time_steps  # noqa: E402
from ctclip.findings import FINDINGS  # noqa: E402
from ctclip.models.factory import get_model_config  # noqa: E402
from ctclip.models.text import (  # noqa: E402
    TextTransformer,
    _additive_mask,
    _project,
    build_text_tower,
    encode_tokens,
    sentence_layout,
    tokenize,
)
from ctclip.synthetic.reports import compose_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", type=int, default=32, help="reports per batch")
    p.add_argument("--model", default="tiny_cnn", help="architecture whose text tower is timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p


def synthetic_reports(n: int, seed: int) -> list[str]:
    """Findings + impression of `n` synthetic reports, each finding present with probability 0.35."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        present = [f for f in FINDINGS if rng.random() < 0.35]
        r = compose_report({f: {} for f in present}, rng, z_spacing=1.5, empty_impression_rate=0.1)
        impression = r["Impressions_EN"] if isinstance(r["Impressions_EN"], str) else ""
        texts.append(f"{r['Findings_EN']} {impression}".strip())
    return texts


def masked_sentence_pool(tower: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The reference: the sentence pool over whole reports, (B, L, L) mask (a word token sees the word tokens
    of its own sentence; start, end and padding tokens see only themselves), positions from each sentence's
    start, then the mean over each sentence's word tokens and the mean over the report's sentences."""
    length = max(int((tokens != 0).sum(dim=1).max()), 1)
    cut = tokens[:, :length]
    sentence, position, word = sentence_layout(cut)
    x = tower.token_embedding(cut) + tower.positional_embedding[position]
    same = (sentence[:, :, None] == sentence[:, None, :]) & word[:, :, None] & word[:, None, :]
    same |= torch.eye(length, dtype=torch.bool)
    x = tower.ln_final(tower.transformer(x, attn_mask=_additive_mask(same, tower, x.dtype)))
    n, _, width = x.shape
    w = word.to(x.dtype)
    sums = torch.zeros(n, length, width).scatter_add_(1, sentence.unsqueeze(-1).expand(-1, -1, width),
                                                       x * w.unsqueeze(-1))
    counts = torch.zeros(n, length).scatter_add_(1, sentence, w)
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    pooled = means.sum(dim=1) / (counts > 0).sum(dim=1, keepdim=True).clamp_min(1)
    return _project(tower, pooled)


def packed_sentence_pool(tower: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    return encode_tokens(tower, tokens, pool="sentence", causal=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [f"--{k} {getattr(args, k)}" for k in ("reports", "threads", "steps", "repeats") if getattr(args, k) < 1]
    if bad:  # refused before any work
        parser.error(f"must be at least 1: {', '.join(bad)}")
    try:
        cfg = get_model_config(args.model)
    except ValueError as e:  # UsageError: an unknown architecture
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tower = build_text_tower(cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.embed_dim)
    tokens = tokenize(synthetic_reports(args.reports, args.seed), cfg.context_length)
    n_tokens = (tokens != 0).sum(dim=1).float()
    with torch.no_grad():
        diff = float((packed_sentence_pool(tower, tokens) - masked_sentence_pool(tower, tokens)).abs().max())
    print(f"embeddings of the two: max abs difference {diff:.2e}")
    if diff > 1e-4:
        print("error: the packed and the masked sentence pool differ", file=sys.stderr)
        return 1
    arms = {"packed sentences (ours)": packed_sentence_pool, "whole reports, sentence mask (reference)": masked_sentence_pool}
    def one_round(pool):
        def run() -> tuple[float, float]:
            t = copy.deepcopy(tower)
            return time_steps(t.parameters(), lambda: pool(t, tokens).sum(), args.steps)
        return run

    runs, med = interleaved({name: one_round(pool) for name, pool in arms.items()}, args.repeats)
    print(f"\n{args.reports} reports per step ({n_tokens.mean():.0f} tokens on average, longest {n_tokens.max():.0f}), "
          f"{args.model}'s text tower (width {cfg.text_width}, {cfg.text_layers} layers), {args.threads} thread(s), "
          f"torch {torch.__version__}; median of {args.repeats} x {args.steps} steps\n")
    print_table("sentence pool", med)
    names = list(arms)
    speedup = med[names[1]][0] / med[names[0]][0]
    print(f"\npacking needs {speedup:.2f}x less CPU time per step")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median": med,
                                         "runs": runs, "cpu_speedup": speedup, "max_abs_diff": diff,
                                         "mean_tokens": float(n_tokens.mean())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

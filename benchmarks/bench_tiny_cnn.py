"""Benchmark: one training step of the `tiny_cnn` slice encoder in channels-last layout (ours) against the same
network in the default contiguous layout (the reference), measured in the same run.

    python benchmarks/bench_tiny_cnn.py                   # 1024 slices of 64 x 64 (a batch of 32 volumes x 32
                                                          # slices, the learning benchmark's), one thread, ~1 min
    python benchmarks/bench_tiny_cnn.py --slices 256 --threads 2 --repeats 5 --json tiny_cnn.json
    python benchmarks/bench_tiny_cnn.py --hist_bins 32 --gran_levels 3  # with tiny_cnn.yaml's fixed branches

Run it with and without the branches to see what the histograms and the granulometry cost a step.

A step is what training does to the slice encoder: forward over all slices in chunks of --chunk (BatchNorm
statistics per chunk, as `SliceEncoder` runs it), a scalar loss, backward and an AdamW step. Both layouts
start from the same weights and see the same random slices; the script first checks that they compute the
same features (max abs difference printed), then times --repeats rounds of --steps steps each, the two
layouts interleaved, as process CPU time (user + system, all threads) and wall time; medians are reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.step_timer import interleaved, print_table, time_steps  # noqa: E402
from ctclip.models.tiny_cnn import TinySliceCNN  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=1024)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hist_bins", type=int, default=0, help="the histogram branch in both networks (tiny_cnn.yaml: 32)")
    p.add_argument("--gran_levels", type=int, default=0,
                   help="the granulometry branch in both networks (tiny_cnn.yaml: 3)")
    p.add_argument("--json", type=Path)
    return p


def encode(model: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([model(part) for part in x.split(chunk)])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [f"--{k} {getattr(args, k)}" for k in ("slices", "image_size", "chunk", "threads", "steps", "repeats")
           if getattr(args, k) < 1]
    bad += [f"--{k} {getattr(args, k)}" for k in ("hist_bins", "gran_levels") if getattr(args, k) < 0]
    if bad:  # refused before any work
        parser.error(f"out of range (at least 1; the branches at least 0): {', '.join(bad)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    branches = {"hist_bins": args.hist_bins, "gran_levels": args.gran_levels}
    ours = TinySliceCNN(image_size=args.image_size, **branches)
    ref = TinySliceCNN(image_size=args.image_size, channels_last=False, **branches)  # the reference: NCHW layout
    ref.load_state_dict(ours.state_dict())
    x = torch.rand(args.slices, 1, args.image_size, args.image_size) * 2 - 1
    with torch.no_grad():
        diff = float((encode(ours, x, args.chunk) - encode(ref, x, args.chunk)).abs().max())
    print(f"features of the two layouts: max abs difference {diff:.2e}")
    if diff > 1e-3:
        print("error: the two layouts compute different features", file=sys.stderr)
        return 1
    def one_round(model: TinySliceCNN):
        def run() -> tuple[float, float]:
            m = copy.deepcopy(model)
            return time_steps(m.parameters(), lambda: encode(m, x, args.chunk).pow(2).mean(), args.steps)
        return run

    runs, med = interleaved({"channels_last (ours)": one_round(ours), "contiguous (reference)": one_round(ref)},
                            args.repeats)
    print(f"\n{args.slices} slices of {args.image_size} px per step, chunks of {args.chunk}, {args.threads} thread(s), "
          f"histogram bins {args.hist_bins}, granulometry levels {args.gran_levels}, torch {torch.__version__}; "
          f"median of {args.repeats} x {args.steps} steps\n")
    print_table("layout", med)
    speedup = med["contiguous (reference)"][0] / med["channels_last (ours)"][0]
    print(f"\nchannels_last needs {speedup:.2f}x less CPU time per step")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median": med,
                                         "runs": runs, "cpu_speedup": speedup, "max_abs_diff": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

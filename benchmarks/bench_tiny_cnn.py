"""Benchmark: one training step of the `tiny_cnn` slice encoder in channels-last layout (ours) against the same
network in the default contiguous layout (the reference), measured in the same run.

    python benchmarks/bench_tiny_cnn.py                   # 1024 slices of 64 x 64 (a batch of 32 volumes x 32
                                                          # slices, the learning benchmark's), one thread, ~1 min
    python benchmarks/bench_tiny_cnn.py --slices 256 --threads 2 --repeats 5 --json tiny_cnn.json
    python benchmarks/bench_tiny_cnn.py --hist_bins 32 --gran_levels 3  # with tiny_cnn.yaml's fixed branches

Run it with and without the branches to see what the histograms and the granulometry cost a step.

    python benchmarks/bench_tiny_cnn.py --hist_bins 32 --gran_levels 3 --in_chans 2 --memo

With --memo the two arms are instead the branches' features kept per slice (`FixedFeatureMemo`, ours: the
digests of the uint8 slices are taken every step, as `SliceEncoder` does) against computed every step (the
reference), both channels-last; the slices are the same every step, so after the untimed first step every
lookup hits: the steady state of a training run's second and later epochs (its first epoch costs what the
reference does, plus the digests).

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
from ctclip.models.tiny_cnn import TinySliceCNN, slice_digests  # noqa: E402


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
    p.add_argument("--in_chans", type=int, default=1,
                   help="input channels (2: slice_norm window_mediastinal, the learning configs')")
    p.add_argument("--memo", action="store_true",
                   help="compare the fixed-feature memo against recomputing (needs --hist_bins or --gran_levels)")
    p.add_argument("--json", type=Path)
    return p


def encode(model: torch.nn.Module, x: torch.Tensor, chunk: int, u8: torch.Tensor | None = None) -> torch.Tensor:
    """The slices in chunks; with `u8` (the stored slices of `x`) each chunk's digests are passed as its keys."""
    if u8 is None:
        return torch.cat([model(part) for part in x.split(chunk)])
    return torch.cat([model(part, slice_keys=slice_digests(raw)) for part, raw in zip(x.split(chunk), u8.split(chunk))])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [f"--{k} {getattr(args, k)}" for k in ("slices", "image_size", "chunk", "threads", "steps", "repeats",
                                                  "in_chans") if getattr(args, k) < 1]
    bad += [f"--{k} {getattr(args, k)}" for k in ("hist_bins", "gran_levels") if getattr(args, k) < 0]
    if bad:  # refused before any work
        parser.error(f"out of range (at least 1; the branches at least 0): {', '.join(bad)}")
    if args.memo and not (args.hist_bins or args.gran_levels):
        parser.error("--memo needs the fixed branches (--hist_bins and/or --gran_levels)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    branches = {"hist_bins": args.hist_bins, "gran_levels": args.gran_levels, "in_chans": args.in_chans,
                "hist_channels": args.in_chans}
    ours = TinySliceCNN(image_size=args.image_size, **branches)
    # the reference: the NCHW layout, or (--memo) the same network recomputing the fixed branches every step
    ref = TinySliceCNN(image_size=args.image_size, channels_last=args.memo, **branches)
    ref.load_state_dict(ours.state_dict())
    ref.fixed_memo = None if args.memo else ref.fixed_memo
    u8 = torch.randint(0, 256, (args.slices, 1, args.image_size, args.image_size), dtype=torch.uint8)
    x = (u8.float() / 127.5 - 1.0).repeat(1, args.in_chans, 1, 1)
    keys = u8 if args.memo else None
    with torch.no_grad():
        diff = float((encode(ours, x, args.chunk, keys) - encode(ref, x, args.chunk, keys)).abs().max())
    arms = ("fixed features kept (ours)", "recomputed (reference)") if args.memo else \
        ("channels_last (ours)", "contiguous (reference)")
    print(f"features of the two arms: max abs difference {diff:.2e}")
    if diff > 1e-3:
        print("error: the two arms compute different features", file=sys.stderr)
        return 1

    def one_round(model: TinySliceCNN):
        def run() -> tuple[float, float]:
            m = copy.deepcopy(model)
            return time_steps(m.parameters(), lambda: encode(m, x, args.chunk, keys).pow(2).mean(), args.steps)
        return run

    runs, med = interleaved({arms[0]: one_round(ours), arms[1]: one_round(ref)}, args.repeats)
    print(f"\n{args.slices} slices of {args.image_size} px per step, {args.in_chans} channel(s), chunks of {args.chunk}, "
          f"{args.threads} thread(s), histogram bins {args.hist_bins}, granulometry levels {args.gran_levels}, torch "
          f"{torch.__version__}; median of {args.repeats} x {args.steps} steps\n")
    print_table("fixed features" if args.memo else "layout", med)
    speedup = med[arms[1]][0] / med[arms[0]][0]
    print(f"\n{arms[0].split(' (')[0]} needs {speedup:.2f}x less CPU time per step")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median": med,
                                         "runs": runs, "cpu_speedup": speedup, "max_abs_diff": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

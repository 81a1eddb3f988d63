"""Learning benchmarks: does each pipeline learn its synthetic task within a CPU budget?

    python benchmarks/bench_learning.py                                  # both parts, their default budgets
    python benchmarks/bench_learning.py --part ctclip --ctclip_budget_minutes 15
    python benchmarks/bench_learning.py --part hemorrhage --work_dir runs/bench_learning --json out.json

- ctclip (benchmarks/bench_learning_ctclip.py): zero-shot mean AUROC over the planted findings on held-out
  synthetic patients after a fixed CPU training budget, end to end and with the frozen-backbone slice
  embedding cache, with bootstrap CIs. Goal: >= 0.85 within 15 CPU-minutes.
- hemorrhage (benchmarks/bench_learning_hemorrhage.py): weighted log loss and per-subtype AUROC on held-out
  synthetic studies against the prevalence prior. Goal: <= 0.5 x the prior's weighted log loss.

Each part builds its own data in the work folder (a temporary one unless --work_dir), trains through
the project's own scripts, writes a training-curve figure from the training logs, and prints a markdown
report with the verdict; the parts' flags are listed under their own headings in --help. The two parts
are independent modules (ctclip and hemorrhage never import each other); this script only runs them in
turn and writes one JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `scripts` importable like the tests do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_learning_ctclip, bench_learning_hemorrhage  # noqa: E402

PARTS = {"ctclip": bench_learning_ctclip, "hemorrhage": bench_learning_hemorrhage}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=sorted(PARTS), default=sorted(PARTS), help="which benchmarks")
    p.add_argument("--work_dir", type=Path, default=None,
                   help="keep data, runs and figures here (default: a temporary folder, figures copied to --json's folder)")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    for name, module in PARTS.items():
        module.add_arguments(p.add_argument_group(name))
    return p


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def run(args: argparse.Namespace, work: Path) -> dict:
    if "ctclip" in args.part and args.ctclip_data_dir is None:
        bench_learning_ctclip.check_sides(args)  # refused before the other parts run
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": machine(), "command": "python benchmarks/bench_learning.py " +
                     shlex.join(sys.argv[1:] if args.argv is None else args.argv), "parts": {}}
    print(f"# learning benchmarks, {results['date']}\nmachine: {results['machine']}\ncommand: {results['command']}\n")
    for name in args.part:
        t = time.perf_counter()
        part_dir = work / name
        part_dir.mkdir(parents=True, exist_ok=True)
        result = PARTS[name].run(args, part_dir)
        result["bench_wall_s"] = round(time.perf_counter() - t, 1)
        results["parts"][name] = result
        print(PARTS[name].report(result), flush=True)
        print(f"\n({name}: benchmark wall time {result['bench_wall_s']:.0f} s)\n", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return _main(args)
    except bench_learning_ctclip.SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        results = run(args, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
            results = run(args, Path(tmp))
            if args.json is not None:  # keep the figures: the temporary folder goes away
                keep = args.json.parent / "bench_learning_figures"
                keep.mkdir(parents=True, exist_ok=True)
                for part in results["parts"].values():
                    for key, value in list(part.items()):
                        if isinstance(value, str) and value.endswith(".png") and Path(value).is_file():
                            target = keep / Path(value).name
                            target.write_bytes(Path(value).read_bytes())
                            part[key] = str(target)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

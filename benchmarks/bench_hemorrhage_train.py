"""Benchmark: hemorrhage CNN training throughput (images/s) and whether data loading keeps up with the step.

    python benchmarks/bench_hemorrhage_train.py            # CPU: the tiny config (tiny_densenet, 64 px, batch 16,
                                                        # fp32), every CPU as a DataLoader worker; ~2 min on 2 cores
    python benchmarks/bench_hemorrhage_train.py --json bench_train.json   # on a CUDA machine: se_resnext101_32x4d,
                                                        # DenseNet169_change_avg, DenseNet121_change_avg at 256 px,
                                                        # batch 32, bf16 autocast, channels_last, one row each
    python benchmarks/bench_hemorrhage_train.py --model DenseNet121_change_avg --batch_size 64 --num_workers 12
    python benchmarks/bench_hemorrhage_train.py --steps 3 --warmup 1 --repeats 1 --n_studies 2 --size 64 \\
        --num_workers 0                                 # plumbing check, ~15 s
    python benchmarks/bench_hemorrhage_train.py --data_dir prepared_subset --labels stage_2_train.csv   # other data

Data: synthetic head CT studies (scripts/hemorrhage_make_synthetic.py with configs/hemorrhage/synthetic_small.yaml,
--n_studies/--size/--slices, 512x512 as RSNA, no broken files), prepared into npz stacks by
hemorrhage.run.prepare.run_prepare exactly as hemorrhage_train.py prepares a DICOM --data_dir; or --data_dir (a DICOM
tree or a prepared folder) with --labels. The stacks are small enough to sit in the page cache: disk reads are
not measured. A folds.csv that puts every study in fold 1 is written first, and fold 0 is trained: every study
trains and the validation set is empty (validation is not part of training's images/s; it is skipped).

Each row (one architecture, input size, batch, precision) makes three measurements on the same images, all
through training's own code (hemorrhage.run.train_cnn.run_training, unmodified: one epoch of warm-up + measured
batches, --max_draws = batches x batch size):
  (1) loader alone   the DataLoader that run_training built for (3) (the same TrainSlices dataset, EpochDraws
                     sampler and epoch, so the same images; augmentations, workers, pin_memory, batch size),
                     iterated again with no model
  (2) step alone     run_training again with (1)'s batches replayed from memory (pinned when training pins them):
                     host-to-device copy, normalisation, channels_last, autocast, forward, BCE, backward, Adam step
                     and float(loss), exactly as the training loop does them, with no data to wait for
  (3) end to end     run_training as it is: DataLoader workers + the step
To time inside the unmodified loop, run_training runs while `hemorrhage.run.train_cnn.DataLoader` is a subclass whose
TrainSlices loader records when the loop asked for each batch and when it got it (or replays (1)'s batches;
benchmarks/hemorrhage_train_clock.py);
on CUDA the device is synchronised before each request. Every rate covers the same batches: from the arrival of
batch F to that of batch L (0-based), F = max(--warmup, W) leaves out the epoch's start (worker start-up, model
warm-up), and L - F >= --steps is a multiple of W = max(workers, 1): batch i comes from worker i mod W and the W
workers' batches arrive in bursts, so whole rounds keep the bursts from biasing (1). Rate = images of batches
F..L-1 / that time; the loop's data wait share in (3) = time between asking for and getting a batch / that time.
Ratios: loader / step (target >= 1.2: the loader can feed 20% more than the step consumes) and end to end / step
(1.0 = data costs the loop nothing). (1)-(3) run --repeats times, interleaved; medians are reported (ratios of
the medians). For reference the epoch's images/s as training itself logs it (the whole epoch: worker start-up and
warm-up included, so short epochs read low) is shown too.
On the CPU, (1) uses W worker processes and (2) the main process's torch threads, each with the machine to
itself; in (3) they share its cores, so the output names the worker count, the torch threads and the CPU count.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

import hemorrhage.run.train_cnn as train_cnn
from ctcore.cli import parse_args
from ctcore.errors import UsageError
from hemorrhage.ensemble import resolve_device
from hemorrhage.inference_data import find_series, is_prepared_folder
from hemorrhage.models.cnn import list_cnns
from hemorrhage.run.prepare import PrepareConfig, run_prepare
from hemorrhage.run.train_cnn import TrainConfig, run_training
from hemorrhage.series import resolve_workers

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable like the tests do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hemorrhage_train_clock import EpochClock, clocked, measured_window, probe_training_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TINY = ROOT / "configs" / "hemorrhage" / "train_tiny.yaml"
SYNTH_CONFIG = ROOT / "configs" / "hemorrhage" / "synthetic_small.yaml"
GPU_MODELS = ("se_resnext101_32x4d", "DenseNet169_change_avg", "DenseNet121_change_avg")
LOADER_TARGET = 1.2


# ---------------------------------------------------------------------------------------------- data


def make_synthetic(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Synthetic DICOM studies; returns (dicom folder, labels CSV)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.hemorrhage_make_synthetic import main as make

    rc = make(["--config", str(SYNTH_CONFIG), "--out_dir", str(out), "--n_studies", str(args.n_studies),
               "--size", str(args.size), "--slices", str(args.slices), "--broken", "0", "--seed", str(args.seed),
               "--overwrite"])
    if rc:
        raise SystemExit(f"hemorrhage_make_synthetic failed (exit {rc})")
    return out / "dicom", out / "labels.csv"


def prepared_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """(prepared folder, labels CSV, description); a DICOM tree is prepared as train_cnn.training_series does."""
    if args.data_dir is None:
        source, labels = make_synthetic(work / "synthetic", args)
        what = f"{args.n_studies} synthetic studies ({args.size}x{args.size}, up to {args.slices} thick slices)"
    else:
        if args.labels is None:
            raise SystemExit("--data_dir needs --labels")
        source, labels, what = args.data_dir, args.labels, str(args.data_dir)
    logging.getLogger("hemorrhage").setLevel(logging.WARNING)  # the generator set INFO on the root logger
    t = time.perf_counter()
    if not is_prepared_folder(source):
        prepared = work / "prepared"
        run_prepare(PrepareConfig(source, prepared, format="npz", window="header", num_workers=args.num_workers,
                                  overwrite=True, progress=False))
        source = prepared
    jobs, _ = find_series(source, progress=False)
    info = {"what": what, "studies": len({j.study_uid for j in jobs}), "series": len(jobs),
            "slices": sum(j.n_slices for j in jobs), "prepare_s": round(time.perf_counter() - t, 2)}
    return source, labels, info


def write_all_train_folds(path: Path, data_dir: Path) -> None:
    """folds.csv with every study in fold 1 of 2: training fold 0 then trains on every study, validates on none."""
    jobs, _ = find_series(data_dir, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "fold"])
        w.writerows([s, 1] for s in sorted({j.study_uid for j in jobs}))


# ---------------------------------------------------------------------------------------------- one row


@dataclass
class Row:
    model: str
    input_size: int
    batch_size: int
    lr: float


def bench_rows(args: argparse.Namespace, device: torch.device) -> list[Row]:
    tiny = yaml.safe_load(TRAIN_TINY.read_text())
    models = args.model or (list(GPU_MODELS) if device.type == "cuda" else [tiny["model"]])
    rows = []
    for name in models:
        if name not in list_cnns(include_test_only=True):
            raise SystemExit(f"--model {name}: expected one of {', '.join(list_cnns(include_test_only=True))}")
        if name == tiny["model"]:  # the tiny config's own settings
            size, batch, lr = tiny["input_size"], tiny["batch_size"], tiny["lr"]
        else:  # hemorrhage_train.py's defaults (the original's recipe)
            size, batch, lr = TrainConfig.input_size, TrainConfig.batch_size, TrainConfig.lr
        rows.append(Row(name, args.input_size or size, args.batch_size or batch, lr))
    return rows


def resolved_precision(precision: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def run_row(row: Row, data_dir: Path, labels: Path, work: Path, args: argparse.Namespace,
            device: torch.device) -> dict:
    workers = resolve_workers(args.num_workers)
    first, last, n_batches = measured_window(args.warmup, args.steps, workers)
    n_images = n_batches * row.batch_size

    def train(name: str, replay: list | None) -> tuple[EpochClock, dict, DataLoader]:
        out = work / "runs" / f"{row.model}_{row.input_size}_{name}"
        shutil.rmtree(out, ignore_errors=True)
        write_all_train_folds(out / "folds.csv", data_dir)
        cfg = TrainConfig(labels=labels, data_dir=data_dir, output_dir=out, model=row.model, fold=0, n_folds=2,
                          epochs=1, batch_size=row.batch_size, lr=row.lr, input_size=row.input_size,
                          samples_per_study=n_images, max_draws=n_images, precision=args.precision,
                          device=str(device), num_workers=args.num_workers, save_every=0, seed=args.seed,
                          progress=False)
        with probe_training_loader(device, replay) as probe:
            record = run_training(cfg)
        if len(probe.epochs) != 1 or len(probe.epochs[0].sizes) != n_batches:
            raise RuntimeError(f"expected one epoch of {n_batches} batches, got {[len(e.sizes) for e in probe.epochs]}")
        return probe.epochs[0], record, probe.loader

    runs = []
    for _ in range(args.repeats):  # interleaved, so a burst of other work on the machine hits every path alike
        # (3) end to end; the DataLoader it built is then (1)'s
        e2e, logged, loader = train("end_to_end", None)
        # (1) loader alone: that loader object again (the same epoch, so the same draws and images)
        clock = EpochClock()
        batches = list(clocked(DataLoader.__iter__(loader), clock, device))
        # (2) step alone: (1)'s batches replayed from memory
        step, _, _ = train("step", batches)
        del batches
        e2e_rate, wait_share = e2e.rate(first, last)
        runs.append({"loader_images_per_s": clock.rate(first, last)[0],
                     "step_images_per_s": step.rate(first, last)[0],
                     "end_to_end_images_per_s": e2e_rate, "end_to_end_data_wait_share": wait_share,
                     "loader_first_batch_s": clock.first_batch_s(),
                     "logged_epoch_images_per_s": logged["images_per_s"],
                     "logged_data_wait_share": logged["data_wait_share"]})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "model": row.model, "input_size": row.input_size, "batch_size": row.batch_size,
        "precision": resolved_precision(args.precision, device), "channels_last": device.type == "cuda",
        "workers": workers, "pin_memory": bool(loader.pin_memory), "batches_per_epoch": n_batches,
        "warmup_batches": first, "measured_batches": last - first, **med,
        "loader_over_step": med["loader_images_per_s"] / med["step_images_per_s"],
        "end_to_end_over_step": med["end_to_end_images_per_s"] / med["step_images_per_s"],
        "loader_target_met": med["loader_images_per_s"] / med["step_images_per_s"] >= LOADER_TARGET,
        "repeats": runs,
    }


# ---------------------------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cpus_usable": resolve_workers(-1), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "python": platform.python_version(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(r: dict) -> None:
    m = r["machine"]
    print(f"\n# hemorrhage CNN training benchmark, {r['date']}")
    print(f"machine: {m['cpu']}, {m['cpus_usable']} usable CPUs ({m['cpu_count']} in the machine), device "
          f"{m['device']}, torch {m['torch']} with {m['torch_threads']} threads in the main process; 1-min load "
          f"average {r['load_start']} at the start, {m['load_avg_1min']} at the end (other work skews timings)")
    print(f"command: {r['command']}")
    d = r["data"]
    print(f"data: {d['what']} -> {d['studies']} studies, {d['series']} series, {d['slices']} slices (npz stacks "
          f"in the page cache); every study trains, no validation")
    x0 = r["rows"][0]
    print(f"each row: one epoch of {x0['batches_per_epoch']} batches through hemorrhage.run.train_cnn.run_training per "
          f"path; rates over batches {x0['warmup_batches']}..{x0['warmup_batches'] + x0['measured_batches']} (the "
          f"first {x0['warmup_batches']} are warm-up); median of {r['repeats']} interleaved repeat(s)\n")
    print("| model | px | batch | precision | workers | (1) loader alone img/s | (2) step alone img/s "
          "| (3) end to end img/s | loader / step | end to end / step | (3) data wait | (3) as logged img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        prec = x["precision"] + (" + channels_last" if x["channels_last"] else "")
        print(f"| {x['model']} | {x['input_size']} | {x['batch_size']} | {prec} | {x['workers']} "
              f"| {x['loader_images_per_s']:.1f} | {x['step_images_per_s']:.1f} | {x['end_to_end_images_per_s']:.1f} "
              f"| {x['loader_over_step']:.2f} | {x['end_to_end_over_step']:.2f} "
              f"| {x['end_to_end_data_wait_share']:.1%} | {x['logged_epoch_images_per_s']:.1f} |")
    print()
    for x in r["rows"]:
        print(f"{x['model']} @ {x['input_size']} px: loader / step = {x['loader_over_step']:.2f} (target >= "
              f"{LOADER_TARGET}: {verdict(x['loader_target_met'])}); end to end / step = "
              f"{x['end_to_end_over_step']:.2f}; loader's first batch after {x['loader_first_batch_s']:.2f} s")
    if r["device"] == "cpu":
        w = r["rows"][0]["workers"]
        print(f"note: on the CPU, (1) ran {w} worker process(es) and (2) {m['torch_threads']} torch thread(s), each "
              f"with the machine's {m['cpus_usable']} CPUs to itself; in (3) they share them"
              + (" (workers 0: loading runs in the main process, between steps)" if w == 0 else ""))
    print(f"\nbenchmark wall time {r['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=None,
                   help="architectures, one row each (default: tiny_densenet on the CPU; on CUDA "
                        f"{', '.join(GPU_MODELS)})")
    p.add_argument("--input_size", type=int, default=None, help="default: 64 for tiny_densenet (train_tiny.yaml), "
                   "256 for the others")
    p.add_argument("--batch_size", type=int, default=None, help="default: 16 for tiny_densenet, 32 for the others")
    p.add_argument("--num_workers", type=int, default=-1, help="DataLoader workers (-1 = every usable CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="as hemorrhage_train.py: auto = bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--steps", type=int, default=None,
                   help="measured batches (default: 60 on the CPU, 100 on CUDA; rounded up to whole rounds of "
                        "the workers)")
    p.add_argument("--warmup", type=int, default=8,
                   help="batches left out at the start of each epoch (at least one per worker)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats of (1)-(3) per row; medians are reported (default 3)")
    p.add_argument("--n_studies", type=int, default=16, help="synthetic studies")
    p.add_argument("--size", type=int, default=512, help="rows = columns of the synthetic images (RSNA: 512)")
    p.add_argument("--slices", type=int, default=16, help="thick slices per synthetic series (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", type=Path, default=None,
                   help="instead of synthetic data: a DICOM tree or prepared folder (a subset: it is memory-mapped "
                        "and the page cache should hold it)")
    p.add_argument("--labels", type=Path, default=None, help="RSNA-format labels for --data_dir")
    p.add_argument("--work_dir", type=Path, default=None, help="keep the data and training outputs here")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p


def run(work: Path, args: argparse.Namespace, device: torch.device) -> dict:
    plan = bench_rows(args, device)  # bad names fail before any data is made
    data_dir, labels, info = prepared_data(work, args)
    rows = []
    for row in plan:
        rows.append(run_row(row, data_dir, labels, work, args, device))
        x = rows[-1]
        print(f"  {row.model} @ {row.input_size} px: loader {x['loader_images_per_s']:.1f}, step "
              f"{x['step_images_per_s']:.1f}, end to end {x['end_to_end_images_per_s']:.1f} images/s", flush=True)
    return {"data": info, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    t0, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    device = resolve_device(args.device)
    if args.steps is None:
        args.steps = 100 if device.type == "cuda" else 60
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1, --warmup >= 0")
    try:
        train_cnn.autocast_for(args.precision, device)  # training's own check, before any data is made
    except UsageError as e:
        raise SystemExit(f"bench_hemorrhage_train: {e}") from None
    command = "python benchmarks/bench_hemorrhage_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            r = run(args.work_dir, args, device)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_hemorrhage_train_") as tmp:
                r = run(Path(tmp), args, device)
    except UsageError as e:  # what hemorrhage_train.py refuses too (e.g. labels that match no slice)
        print(f"bench_hemorrhage_train: {e}", file=sys.stderr)
        return 2
    r.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), command=command.strip(),
             device=device.type, machine=machine(device), load_start=load_start, steps=args.steps,
             repeats=args.repeats, seconds=time.perf_counter() - t0)
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

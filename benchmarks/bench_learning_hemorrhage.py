"""Learning benchmark, hemorrhage half: does the CNN (+ sequence head) learn the synthetic head studies?

    python benchmarks/bench_learning_hemorrhage.py                 # defaults: ~13 CPU-minutes on one thread
    python benchmarks/bench_learning_hemorrhage.py --hem_sequence_config none --hem_train_folds 0   # CNN only
    python benchmarks/bench_learning_hemorrhage.py --hem_n_train 8 --hem_n_test 4 --hem_size 64 --hem_epochs 1 \\
        --hem_head_epochs 2 --hem_n_folds 2 --hem_n_bootstrap 50 --work_dir DIR     # plumbing check, seconds
    # benchmarks/bench_learning.py imports it: add_arguments(parser), run(args, work_dir) -> dict, report(dict)

Steps, each through the project's own scripts (their main(argv)) or package functions:
  1. training studies (hemorrhage_make_synthetic.py, configs/hemorrhage/synthetic_small.yaml settings,
     --hem_n_train studies of --hem_size px, seed --hem_train_seed, no broken files) and held-out studies
     (another seed, --hem_test_seed: other heads, other bleeds);
  2. the CNN (hemorrhage_train.py --config --hem_train_config) on each fold of --hem_train_folds of a
     --hem_n_folds split by study (folds.csv); validation picks each fold's best epoch;
  3. with a sequence head (--hem_sequence_config; 'none' = CNN only): out-of-fold features of the training
     studies (hemorrhage_extract_features.py; every fold must be trained) and the head on every fold
     (hemorrhage_train_sequence.py); inference averages the heads, as it averages CNN folds;
  4. inference on the held-out studies (hemorrhage_infer.py, --hem_tta) and evaluation with
     hemorrhage.run.evaluate.run_eval: the competition's weighted log loss and per-subtype AUROC with study-
     bootstrap CIs, against the prior baseline (the training labels' prevalence as a constant prediction);
  5. a training-curve figure from the training logs (train_log_<fold>.jsonl of the CNN and of the head).
The goal (issue 8): held-out weighted log loss <= --hem_goal (0.5) x the prior's. Training CPU time is the
user + system time of this process and its children over steps 2-3 (torch on --hem_threads threads,
DataLoader in-process), next to the wall time; other work on the machine changes the wall time only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ctcore.cli import parse_args
from hemorrhage.classes import CLASSES
from hemorrhage.run.evaluate import EvalConfig, run_eval

if __package__ in (None, ""):  # run as a file: make `scripts` importable like the tests do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctcore.atomic import atomic_write  # noqa: E402
from scripts.hemorrhage_extract_features import main as extract_features  # noqa: E402
from scripts.hemorrhage_infer import main as infer  # noqa: E402
from scripts.hemorrhage_make_synthetic import main as make_synthetic  # noqa: E402
from scripts.hemorrhage_train import main as train_cnn  # noqa: E402
from scripts.hemorrhage_train_sequence import main as train_sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "hemorrhage"
SYNTH = CONFIGS / "synthetic_small.yaml"


def add_arguments(g: argparse._ActionsContainer) -> None:
    """The benchmark's flags, all --hem_*, on a parser or an argument group (bench_learning.py holds them
    beside the chest ones)."""
    g.add_argument("--hem_train_config", type=Path, default=CONFIGS / "train_learning.yaml",
                   help="hemorrhage_train.py --config (model, input size, epochs, schedule)")
    g.add_argument("--hem_sequence_config", default=str(CONFIGS / "sequence_learning.yaml"),
                   help="hemorrhage_train_sequence.py --config, or 'none' for the CNN alone")
    g.add_argument("--hem_n_train", type=int, default=160, help="synthetic training studies")
    g.add_argument("--hem_n_test", type=int, default=48, help="synthetic held-out studies")
    g.add_argument("--hem_size", type=int, default=128, help="rows = columns of the synthetic images")
    g.add_argument("--hem_slices", type=int, default=16, help="thick slices per synthetic series (at most)")
    g.add_argument("--hem_train_seed", type=int, default=3, help="seed of the training studies")
    g.add_argument("--hem_test_seed", type=int, default=4, help="seed of the held-out studies")
    g.add_argument("--hem_n_folds", type=int, default=4, help="folds of the study split (folds.csv)")
    g.add_argument("--hem_train_folds", type=int, nargs="+", default=None,
                   help="CNN folds to train (default: every fold; a sequence head needs every fold)")
    g.add_argument("--hem_epochs", type=int, default=None, help="override the training config's epochs")
    g.add_argument("--hem_head_epochs", type=int, default=None, help="override the sequence config's epochs")
    g.add_argument("--hem_seed", type=int, default=0, help="training seed (weights, draws, augmentation)")
    g.add_argument("--hem_tta", default="0", help="hemorrhage_infer.py --tta on the held-out studies")
    g.add_argument("--hem_n_bootstrap", type=int, default=1000, help="study-bootstrap resamples for the CIs")
    g.add_argument("--hem_goal", type=float, default=0.5, help="goal: weighted log loss <= GOAL x the prior's")
    g.add_argument("--hem_threads", type=int, default=1, help="torch threads (1: the machine is shared)")


# ---------------------------------------------------------------------------------------------- timing


def cpu_seconds() -> float:
    """User + system time of this process and of its waited-for children (DataLoader workers, pools)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(stages: dict[str, dict], name: str, call: Callable[[], int], ok: tuple[int, ...] = (0,)) -> None:
    """Run one step, record its wall and CPU seconds under `name`; a non-zero exit status is an error."""
    w, c = time.perf_counter(), cpu_seconds()
    rc = call()
    stages[name] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}
    if rc not in ok:
        raise RuntimeError(f"bench_learning_hemorrhage: step {name!r} exited with status {rc}")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- run


def _synth_args(out: Path, n: int, seed: int, args: argparse.Namespace) -> list[str]:
    return ["--config", str(SYNTH), "--out_dir", str(out), "--overwrite", "--n_studies", str(n), "--size",
            str(args.hem_size), "--slices", str(args.hem_slices), "--seed", str(seed), "--broken", "0"]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _folds(args: argparse.Namespace, head: bool) -> list[int]:
    folds = list(range(args.hem_n_folds)) if args.hem_train_folds is None else sorted(set(args.hem_train_folds))
    if not folds or not all(0 <= f < args.hem_n_folds for f in folds):
        raise ValueError(f"--hem_train_folds {args.hem_train_folds}: expected folds in 0..{args.hem_n_folds - 1}")
    if head and len(folds) != args.hem_n_folds:
        raise ValueError("a sequence head trains on out-of-fold features of every training study: train every "
                         "CNN fold (leave --hem_train_folds unset) or use --hem_sequence_config none")
    return folds


def run(args: argparse.Namespace, work_dir: Path) -> dict:
    """Synthesize, train, infer and evaluate in `work_dir`; returns the JSON-serialisable result."""
    head = str(args.hem_sequence_config).lower() != "none"
    folds = _folds(args, head)
    work = Path(work_dir)
    train_set, test_set = work / "train_studies", work / "test_studies"
    cnn_dir, feat_dir, seq_dir = work / "cnn", work / "features", work / "sequence"
    pred, eval_dir = work / "infer" / "predictions.csv", work / "eval"
    stages: dict[str, dict] = {}
    quiet = ["--no_progress"]
    with torch_threads(args.hem_threads):
        timed(stages, "synthesize_train", lambda: make_synthetic(
            _synth_args(train_set, args.hem_n_train, args.hem_train_seed, args)))
        timed(stages, "synthesize_test", lambda: make_synthetic(
            _synth_args(test_set, args.hem_n_test, args.hem_test_seed, args)))
        labels = train_set / "labels.csv"
        for k in folds:
            cmd = ["--config", str(args.hem_train_config), "--labels", str(labels), "--data_dir",
                   str(train_set / "dicom"), "--output_dir", str(cnn_dir), "--n_folds", str(args.hem_n_folds),
                   "--fold", str(k), "--seed", str(args.hem_seed), "--num_workers", "0", "--device", "cpu", *quiet]
            if args.hem_epochs is not None:
                cmd += ["--epochs", str(args.hem_epochs)]
            timed(stages, f"train_cnn_fold{k}", lambda cmd=cmd: train_cnn(cmd))
        weights = ["--weights_dir", str(cnn_dir), "--num_workers", "0", "--device", "cpu", "--tta", args.hem_tta]
        if head:
            timed(stages, "extract_features", lambda: extract_features(
                ["--data_dir", str(train_set / "dicom"), "--output_dir", str(feat_dir), *weights, *quiet]))
            for k in folds:
                cmd = ["--config", str(args.hem_sequence_config), "--features_dir", str(feat_dir), "--labels",
                       str(labels), "--output_dir", str(seq_dir), "--fold", str(k), "--seed", str(args.hem_seed),
                       "--device", "cpu", *quiet]
                if args.hem_head_epochs is not None:
                    cmd += ["--epochs", str(args.hem_head_epochs), "--milestones", str(args.hem_head_epochs)]
                timed(stages, f"train_sequence_fold{k}", lambda cmd=cmd: train_sequence(cmd))
        seq = ["--sequence_weights", str(seq_dir)] if head else []
        timed(stages, "infer_test", lambda: infer(["--data_dir", str(test_set / "dicom"), "--output", str(pred),
                                                   *weights, *seq, *quiet]))
    w, c = time.perf_counter(), cpu_seconds()
    summary = run_eval(EvalConfig(predictions=pred, labels=test_set / "labels.csv", output_dir=eval_dir,
                                  per_slice=pred.with_name("predictions_per_slice.csv"), train_labels=labels,
                                  n_bootstrap=args.hem_n_bootstrap, seed=0))
    stages["evaluate"] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu_seconds() - c, 2)}

    m = summary.metrics
    member = next(p.parent for p in sorted(cnn_dir.glob("*/train_log_*.jsonl")))
    cnn_logs = {k: read_log(member / f"train_log_{k}.jsonl") for k in folds}
    seq_logs = {k: read_log(seq_dir / f"train_log_{k}.jsonl") for k in folds} if head else {}
    figure = work / "hemorrhage_learning_curves.png"
    plot_curves(figure, cnn_logs, seq_logs, member.name)
    training = [s for s in stages if s.startswith(("train_", "extract_"))]
    wll, prior = m["weighted_log_loss"], m["baseline"]["weighted_log_loss"]
    ratio = wll["value"] / prior
    return {
        "what": "hemorrhage: held-out synthetic head CT studies vs the prior baseline",
        "weighted_log_loss": wll, "prior_weighted_log_loss": prior, "ratio_to_prior": ratio,
        "goal_ratio": args.hem_goal, "goal_met": bool(ratio <= args.hem_goal),
        "mean_auroc": m["mean_auroc"],
        "per_class": {c: {k: m["per_class"][c][k] for k in ("auroc", "lower", "upper", "n", "n_pos", "log_loss")}
                      | {"prior_log_loss": m["baseline"]["per_class_log_loss"][c]} for c in CLASSES},
        "bootstrap": {k: m["bootstrap"][k] for k in ("n_bootstrap", "ci", "unit", "n_units")},
        "n_slices": m["matching"]["n_slices_evaluated"],
        "data": {"train_studies": args.hem_n_train, "test_studies": args.hem_n_test, "size": args.hem_size,
                 "slices": args.hem_slices, "train_seed": args.hem_train_seed, "test_seed": args.hem_test_seed},
        "model": {"member": member.name, "folds_trained": folds, "n_folds": args.hem_n_folds,
                  "train_config": str(args.hem_train_config), "epochs_override": args.hem_epochs,
                  "sequence_config": str(args.hem_sequence_config) if head else None, "tta": args.hem_tta,
                  "seed": args.hem_seed, "torch_threads": args.hem_threads,
                  "best_epochs": {k: min(range(len(v)), key=lambda i, v=v: v[i].get("val_weighted_log_loss",
                                                                                     math.inf))
                                  for k, v in cnn_logs.items()}},
        "stages": stages,
        "training_cpu_s": round(sum(stages[s]["cpu_s"] for s in training), 1),
        "training_wall_s": round(sum(stages[s]["wall_s"] for s in training), 1),
        "figure": str(figure), "eval_dir": str(eval_dir),
    }


# ---------------------------------------------------------------------------------------------- figure


def plot_curves(path: Path, cnn_logs: dict[int, list[dict]], seq_logs: dict[int, list[dict]], member: str) -> None:
    """Per epoch: training loss (solid) and validation weighted log loss (dashed), one colour per fold."""
    fig = Figure(figsize=(12 if seq_logs else 6.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if seq_logs else 1, squeeze=False)[0]
    panels = [(axes[0], cnn_logs, f"CNN {member}: BCE (train), weighted log loss (validation fold)")]
    if seq_logs:
        # the head's training loss is the weighted BCE of its output plus that of its stage-1 output (about 2x)
        panels.append((axes[1], seq_logs, "sequence head: weighted BCE of both outputs (train), weighted log loss "
                                          "(validation)"))
    for ax, logs, title in panels:
        for k, rows in logs.items():
            colour = f"C{k % 10}"
            epochs = [r["epoch"] + 1 for r in rows]
            ax.plot(epochs, [r["train_loss"] for r in rows], "-", color=colour, lw=1.2, label=f"fold {k} train")
            val = [(r["epoch"] + 1, r["val_weighted_log_loss"]) for r in rows if "val_weighted_log_loss" in r]
            if val:
                ax.plot(*zip(*val, strict=True), "--o", color=colour, lw=1.2, ms=3, label=f"fold {k} validation")
            cnn = [(r["epoch"] + 1, r["cnn_val_weighted_log_loss"]) for r in rows if "cnn_val_weighted_log_loss" in r]
            if cnn:
                ax.plot(*zip(*cnn, strict=True), ":", color=colour, lw=1.0, label=f"fold {k} CNN alone (validation)")
        ax.set(xlabel="epoch", ylabel="loss", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


# ---------------------------------------------------------------------------------------------- report


def _ci(d: dict, value: str = "value", digits: int = 3) -> str:
    v, lo, hi = d[value], d.get("lower"), d.get("upper")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def report(result: dict) -> str:
    """Markdown: the headline table, per-subtype AUROC, the verdict, times, the figure and the command."""
    r, d, mdl, b = result, result["data"], result["model"], result["bootstrap"]
    head = f"+ sequence head ({Path(mdl['sequence_config']).name})" if mdl["sequence_config"] else "(no sequence head)"
    lines = [
        f"### Hemorrhage learning benchmark{', ' + r['date'] if 'date' in r else ''}",
        "",
        f"{d['train_studies']} training studies (seed {d['train_seed']}) and {d['test_studies']} held-out studies "
        f"(seed {d['test_seed']}), {d['size']} px, up to {d['slices']} thick slices; {mdl['member']} "
        f"({Path(mdl['train_config']).name}), folds {mdl['folds_trained']} of {mdl['n_folds']} {head}; TTA "
        f"{mdl['tta']}; {r['n_slices']} held-out slices; {b['ci']:.0%} CIs from {b['n_bootstrap']} resamples of "
        f"{b['n_units']} studies.",
        "",
        "| held-out metric | value |",
        "|---|---|",
        f"| weighted log loss [{b['ci']:.0%} CI] | {_ci(r['weighted_log_loss'], digits=4)} |",
        f"| prior baseline (training prevalence) | {r['prior_weighted_log_loss']:.4f} |",
        f"| ratio to the prior | {r['ratio_to_prior']:.3f} |",
        f"| goal: ratio <= {r['goal_ratio']} | **{'met' if r['goal_met'] else 'NOT met'}** |",
        f"| mean AUROC [{b['ci']:.0%} CI] | {_ci(r['mean_auroc'])} |",
        "",
        "| subtype | positive / slices | AUROC [CI] | log loss | prior log loss |",
        "|---|---|---|---|---|",
    ]
    for c, x in r["per_class"].items():
        lines.append(f"| {c} | {x['n_pos']} / {x['n']} | {_ci(x, 'auroc')} | {x['log_loss']:.4f} "
                     f"| {x['prior_log_loss']:.4f} |")
    lines += ["", f"training (CNN folds, features, head): {r['training_cpu_s']:.0f} CPU-s (user+sys), "
                  f"{r['training_wall_s']:.0f} s wall, torch on {mdl['torch_threads']} thread(s); stages:",
              "", "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |" for k, v in r["stages"].items()]
    lines += ["", f"training curves: {r['figure']}"]
    if "machine" in r:
        lines.append(f"machine: {r['machine']}")
    if "command" in r:
        lines.append(f"command: `{r['command']}`")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return (f"{cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}, torch {torch.__version__}, "
            f"1-min load average {os.getloadavg()[0]:.2f} at the end")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p.add_argument_group("hemorrhage learning benchmark"))
    p.add_argument("--work_dir", type=Path, default=None, help="keep the studies, runs and figure here")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    command = "python benchmarks/bench_learning_hemorrhage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            result = run(args, args.work_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_learning_hemorrhage_") as tmp:
                result = run(args, Path(tmp))
                result["figure"] += " (deleted with the temporary folder: use --work_dir)"
    except (ValueError, RuntimeError) as e:
        print(f"bench_learning_hemorrhage: {e}", file=sys.stderr)
        return 2
    result.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), machine=machine(),
                  command=command.strip())
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Learning benchmark, chest half: zero-shot mean AUROC of the 3D CLIP on held-out synthetic patients
after a fixed CPU training budget, end-to-end and on the frozen-backbone slice feature cache.

    python benchmarks/bench_learning_ctclip.py                    # the full benchmark: 15 CPU-minutes per
                                                               # variant, 1 torch thread; ~45 min wall
    python benchmarks/bench_learning_ctclip.py --ctclip_budget_minutes 2 --ctclip_n_patients 120 \\
        --work_dir DIR --json DIR/result.json                  # a quick look (~8 min)

Steps (all through the project's own code): a synthetic CT-RATE set (ctclip_make_synthetic.py with
configs/ctclip/synthetic_learning.yaml: train patients, and valid patients split by patient into a
validation side, scored during training for the curves, and a held-out test side) -> preprocess
(ctclip_preprocess.py, configs/ctclip/preprocess_learning.yaml) -> ctclip_train.py with
configs/ctclip/train_learning.yaml twice under the same budget: end-to-end, and with
--freeze_dinov2 --cache_features (a random-init frozen backbone; building the cache is part of the
budget) -> ctclip.run.evaluate on the test side (the final model, latest.pt; bootstrap CIs by patient)
-> a training-curve figure from both train_log.jsonl files.

Budget: training stops at --ctclip_budget_minutes of `--budget_clock cpu`, i.e. the CPU time (user +
system, every thread) of the training process measured with time.process_time(), validation not
counted, model building and feature caching counted (ctclip.run.train_utils.BudgetClock). With one torch
thread, CPU minutes are close to minutes of one core to itself, whatever else runs on the machine;
wall time is reported beside it. The learning-rate cosine follows the budget, so each run ends at a
low learning rate. The goal: mean AUROC over the findings that have both classes among the test
volumes (all 18 are planted) >= --ctclip_goal (0.85), and every one of them >= --ctclip_goal_min_finding
(0.70).

Used standalone (`main`) or by benchmarks/bench_learning.py through `add_arguments`, `run`, `report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "ctclip"
VARIANTS = ("e2e", "cached")
VARIANT_FLAGS = {"e2e": [], "cached": ["--freeze_dinov2", "--cache_features"]}
VARIANT_NAMES = {"e2e": "end-to-end", "cached": "frozen backbone + feature cache"}

log = logging.getLogger("bench_learning_ctclip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The chest benchmark's flags, all prefixed --ctclip_."""
    a = parser.add_argument
    a("--ctclip_synth_config", type=Path, default=CONFIGS / "synthetic_learning.yaml",
      help="synthetic set config (ctclip_make_synthetic.py)")
    a("--ctclip_preprocess_config", type=Path, default=CONFIGS / "preprocess_learning.yaml")
    a("--ctclip_train_config", type=Path, default=CONFIGS / "train_learning.yaml")
    a("--ctclip_n_patients", type=int, default=None, help="patients of the synthetic set (default: its config)")
    a("--ctclip_data_dir", type=Path, default=None,
      help="a set built by an earlier run (its ct_rate/ folder: stores, CSVs, split) to reuse instead of building one")
    a("--ctclip_val_volumes", type=int, default=30,
      help="volumes of the validation side (curves); the rest of the valid patients are the test side")
    a("--ctclip_budget_minutes", type=float, default=15.0, help="training budget per variant")
    a("--ctclip_budget_clock", choices=["cpu", "wall"], default="cpu")
    a("--ctclip_variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    a("--ctclip_valid_interval", type=int, default=None, help="steps between validations (default: train config)")
    a("--ctclip_batch_size", type=int, default=None, help="global batch (default: train config)")
    a("--ctclip_threads", type=int, default=1, help="torch threads (CPU)")
    a("--ctclip_templates", default=None, help="zero-shot prompts for the test evaluation (default: train config's "
                                               "val_templates, else ctclip)")
    a("--ctclip_n_bootstrap", type=int, default=1000)
    a("--ctclip_goal", type=float, default=0.85, help="mean AUROC to reach")
    a("--ctclip_goal_min_finding", type=float, default=0.70, help="AUROC every finding must reach")
    a("--ctclip_seed", type=int, default=0, help="seed of the synthetic set")


# ---------------------------------------------------------------------------------------------- steps


def _import_scripts() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


class Timer:
    """Wall and CPU seconds of a block, this process and its finished children (preprocess workers)."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.wall0
        self.cpu_s = self._cpu() - self.cpu0

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2)}


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed (exit {rc})")


def build_data(args: argparse.Namespace, data: Path, timings: dict) -> dict[str, Any]:
    """Synthetic set -> preprocessed train/valid stores -> validation/test split by patient."""
    _import_scripts()
    from scripts.ctclip_make_synthetic import main as make
    from scripts.ctclip_preprocess import main as preprocess
    from scripts.ctclip_split import main as split

    argv = ["--config", str(args.ctclip_synth_config), "--out_dir", str(data), "--overwrite",
            "--seed", str(args.ctclip_seed)]
    if args.ctclip_n_patients is not None:
        argv += ["--n_patients", str(args.ctclip_n_patients)]
    with Timer() as t:
        _check(make(argv), "ctclip_make_synthetic")
    timings["synthesize"] = t.as_dict()
    with Timer() as t:
        for side, meta in (("train", "train_metadata.csv"), ("valid", "validation_metadata.csv")):
            _check(preprocess(["--config", str(args.ctclip_preprocess_config), "--overwrite",
                               "--ct_data_path", str(data / "volumes" / side),
                               "--ct_out_path", str(data / f"{side}_volumes.h5"),
                               "--metadata_path", str(data / meta)]), f"ctclip_preprocess ({side})")
    timings["preprocess"] = t.as_dict()
    with Timer() as t:
        _check(split(["--data_dir", str(data), "--target_val_size", str(args.ctclip_val_volumes), "--seed", "42"]),
               "ctclip_split")
    timings["split"] = t.as_dict()
    return json.loads((data / "split_summary.json").read_text())


def train_variant(args: argparse.Namespace, variant: str, data: Path, out: Path, templates: str) -> tuple[list[str], dict]:
    """ctclip_train.py in this process; returns (argv, the summary line's dict)."""
    _import_scripts()
    from ctclip.run.train import TrainConfig, train
    from ctcore.cli import parse_args, to_config
    from scripts.ctclip_train import build_parser, model_config

    argv = ["--config", str(args.ctclip_train_config), "--ct_filepath", str(data / "train_volumes.h5"),
            "--txt_filepath", str(data / "train_reports.csv"), "--output_dir", str(out),
            "--max_minutes", str(args.ctclip_budget_minutes), "--budget_clock", args.ctclip_budget_clock,
            "--do_validate", "--val_ct_filepath", str(data / "valid_volumes.h5"),
            "--val_label_path", str(data / "valid_predicted_labels.csv"), "--device", "cpu",
            *VARIANT_FLAGS[variant]]
    if args.ctclip_valid_interval is not None:
        argv += ["--valid_interval", str(args.ctclip_valid_interval)]
    if args.ctclip_batch_size is not None:
        argv += ["--batch_size", str(args.ctclip_batch_size)]
    argv += ["--val_templates", templates]
    targs = parse_args(build_parser(), argv)
    cfg = to_config(TrainConfig, targs, model=model_config(targs))
    return argv, train(cfg)


def evaluate_variant(args: argparse.Namespace, data: Path, run_dir: Path, out: Path, templates: str) -> dict:
    from ctclip.run.evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(model_path=run_dir / "latest.pt", test_data=data / "valid_volumes.h5",
                               test_labels=data / "test_predicted_labels.csv", output_dir=out,
                               templates=templates, n_bootstrap=args.ctclip_n_bootstrap, num_workers=0,
                               device="cpu"))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(logs: dict[str, list[dict]], path: Path, budget_minutes: float) -> Path:
    """Loss and validation mean AUROC against budget minutes (top) and step (bottom), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for variant, records in logs.items():
        train = [r for r in records if r["kind"] == "train"]
        valid = [r for r in records if r["kind"] == "valid"]
        label = VARIANT_NAMES[variant]
        for row, x in enumerate(("budget_minutes", "step")):
            axes[row, 0].plot([r[x] for r in train], [r["loss"] for r in train], label=label)
            axes[row, 1].plot([r[x] for r in valid], [r["mean_auroc"] for r in valid], marker="o", ms=3, label=label)
    for row, xlabel in enumerate(("training budget used (CPU minutes, validation excluded)", "optimizer step")):
        axes[row, 0].set(xlabel=xlabel, ylabel="contrastive loss (train batch)")
        axes[row, 1].set(xlabel=xlabel, ylabel="zero-shot mean AUROC (validation patients)")
        axes[row, 1].axhline(0.5, color="grey", lw=0.7, ls=":")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"3D CLIP on synthetic chest CT: training curves, budget {budget_minutes:g} min per variant")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def resolve_templates(spec: str) -> str:
    """A preset name as it is; a relative template file from the repository root (as the configs name it)."""
    from ctclip.zeroshot import TEMPLATE_PRESETS

    if spec in TEMPLATE_PRESETS or Path(spec).is_absolute() or Path(spec).is_file():
        return spec
    return str(ROOT / spec)


def _train_config_value(path: Path, key: str) -> Any:
    import yaml

    return (yaml.safe_load(Path(path).read_text()) or {}).get(key)


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    """The whole benchmark in `work_dir`; returns JSON-serialisable results (see `report`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.ctclip_threads)
    try:
        return _run(args, Path(work_dir))
    finally:
        torch.set_num_threads(threads)  # the caller's setting back (bench_learning.py runs other halves after)


class SetupError(ValueError):
    """Settings that cannot give a result; raised before any work."""


def check_sides(args: argparse.Namespace) -> None:
    """Refuse a set whose valid patients cannot fill the validation side and still leave a test side: the
    validation side takes whole patients until it holds --ctclip_val_volumes volumes, so in the worst case
    (one volume per patient) that many patients."""
    import yaml

    synth = yaml.safe_load(Path(args.ctclip_synth_config).read_text()) or {}
    n = args.ctclip_n_patients if args.ctclip_n_patients is not None else int(synth.get("n_patients", 0))
    fraction = float(synth.get("valid_fraction", 0.25))
    valid = round(n * fraction)
    if valid - args.ctclip_val_volumes < 1:
        need = int((args.ctclip_val_volumes + 1) / fraction) + 1 if fraction > 0 else None
        raise SetupError(
            f"{n} patients x valid_fraction {fraction:g} = {valid} valid patients, and the validation side takes up "
            f"to {args.ctclip_val_volumes} of them (--ctclip_val_volumes): no test side would be left. Give at least "
            f"{need} patients (--ctclip_n_patients) or a smaller --ctclip_val_volumes.")


def check_split(split: dict, data: Path) -> None:
    sizes = {side: int((split.get(side) or {}).get("volumes", 0)) for side in ("validation", "test")}
    empty = [side for side, n in sizes.items() if n == 0]
    if empty:
        raise SetupError(f"{data / 'split_summary.json'}: the {' and '.join(empty)} side has no volume "
                         f"(validation {sizes['validation']}, test {sizes['test']} volumes); more patients or a "
                         "smaller --ctclip_val_volumes")


def _run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    timings: dict[str, Any] = {}
    if args.ctclip_data_dir is not None:
        data = Path(args.ctclip_data_dir)
        if not (data / "split_summary.json").is_file():
            raise FileNotFoundError(f"--ctclip_data_dir {data}: no split_summary.json (not a set this benchmark built)")
        split = json.loads((data / "split_summary.json").read_text())
        check_split(split, data)
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        check_sides(args)
        work_dir.mkdir(parents=True, exist_ok=True)
        data = work_dir / "ct_rate"
        split = build_data(args, data, timings)
        check_split(split, data)
    templates = resolve_templates(args.ctclip_templates or _train_config_value(args.ctclip_train_config, "val_templates")
                                  or "ctclip")
    variants: dict[str, Any] = {}
    logs: dict[str, list[dict]] = {}
    for variant in args.ctclip_variants:
        run_dir = work_dir / f"train_{variant}"
        with Timer() as t:
            argv, summary = train_variant(args, variant, data, run_dir, templates)
        timings[f"train_{variant}"] = t.as_dict()
        with Timer() as t:
            ev = evaluate_variant(args, data, run_dir, work_dir / f"eval_{variant}", templates)
        timings[f"eval_{variant}"] = t.as_dict()
        import pandas as pd

        per_finding = pd.read_csv(ev["outputs"]["metrics"])
        per_finding = {str(r["finding"]): float(r["auroc"]) for _, r in per_finding.iterrows()
                       if pd.notna(r["auroc"])}
        logs[variant] = read_log(run_dir / "train_log.jsonl")
        valid = [r for r in logs[variant] if r["kind"] == "valid"]
        variants[variant] = {
            "name": VARIANT_NAMES[variant],
            "train_argv": argv,
            "steps": summary["steps"],
            "stopped_by": summary["stopped_by"],
            "budget_minutes_used": round(summary["budget_minutes"], 3),
            "train_cpu_minutes": round(summary["cpu_minutes"], 3),
            "train_wall_minutes": round(summary["wall_minutes"], 3),
            "best_valid_mean_auroc": summary["best_metric"],
            "last_valid_mean_auroc": valid[-1]["mean_auroc"] if valid else None,
            "test": {"mean_auroc": ev["macro"]["auroc"], "n_units": ev["n_units"], "unit": ev["unit"],
                     "per_finding_auroc": per_finding, "summary": str(work_dir / f"eval_{variant}" / "summary.json"),
                     "roc_figure": ev["outputs"]["roc_curves"]},
            "train_log": str(run_dir / "train_log.jsonl"),
        }
    figure = plot_curves(logs, work_dir / "ctclip_learning_curves.png", args.ctclip_budget_minutes)
    best = max((v["test"]["mean_auroc"]["value"] for v in variants.values()), default=float("nan"))
    for v in variants.values():
        per = v["test"]["per_finding_auroc"]
        v["test"]["min_finding"] = min(per, key=per.get) if per else None
        v["goal_met"] = bool(per and v["test"]["mean_auroc"]["value"] >= args.ctclip_goal
                             and min(per.values()) >= args.ctclip_goal_min_finding)
    return {
        "benchmark": "ctclip_learning",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "bench", *sys.argv[1:]]),
        "machine": machine(),
        "budget": {"minutes": args.ctclip_budget_minutes, "clock": args.ctclip_budget_clock,
                   "counts": "CPU time (user+sys, all threads) of the training process, time.process_time(); "
                             "validation excluded, model build and feature cache included"
                   if args.ctclip_budget_clock == "cpu" else "wall time of training, validation excluded"},
        "data": {"synth_config": str(args.ctclip_synth_config), "n_patients": args.ctclip_n_patients,
                 "split": {k: split[k] for k in ("validation", "test") if k in split},
                 "train_volumes": _count_rows(data / "train_reports.csv")},
        "templates": templates,
        "goal": {"mean_auroc": args.ctclip_goal, "min_finding_auroc": args.ctclip_goal_min_finding, "best": best,
                 "met": any(v["goal_met"] for v in variants.values())},
        "variants": variants,
        "timings": timings,
        "figure": str(figure),
    }


def _count_rows(path: Path) -> int:
    import pandas as pd

    return int(len(pd.read_csv(path, usecols=["VolumeName"])))


# ---------------------------------------------------------------------------------------------- report


def report(result: dict) -> str:
    """Markdown: machine, a table per variant, the goal verdict, the command."""
    m, b = result["machine"], result["budget"]
    lines = [
        "### 3D CLIP learning benchmark (synthetic chest CT, zero-shot on held-out patients)",
        "",
        f"- date {result['date']}; machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, torch threads "
        f"{m['torch_threads']}, torch {m['torch']}, load average {m['load_avg_1min']} at the end",
        f"- budget: {b['minutes']:g} min per variant, {b['counts']}",
        f"- data: {result['data']['train_volumes']} training volumes; test side {result['data']['split'].get('test')}; "
        f"prompts `{result['templates']}`",
        "",
        "| variant | steps | stopped by | budget min | CPU min | wall min | best valid AUROC | test mean AUROC [95% CI] "
        "| findings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in result["variants"].values():
        a = v["test"]["mean_auroc"]
        lines.append(f"| {v['name']} | {v['steps']} | {v['stopped_by']} | {v['budget_minutes_used']:.2f} | "
                     f"{v['train_cpu_minutes']:.2f} | {v['train_wall_minutes']:.2f} | {v['best_valid_mean_auroc']:.3f} | "
                     f"{a['value']:.3f} [{a['lower']:.3f}, {a['upper']:.3f}] | {a['n_findings']} |")
    lines.append("")
    for v in result["variants"].values():
        per = ", ".join(f"{k} {x:.2f}" for k, x in v["test"]["per_finding_auroc"].items())
        lines.append(f"- {v['name']} per finding: {per}")
    g = result["goal"]
    worst = "; ".join(f"{v['name']} {v['test']['min_finding']} {v['test']['per_finding_auroc'][v['test']['min_finding']]:.2f}"
                      for v in result["variants"].values() if v["test"].get("min_finding"))
    lines += ["", f"Goal: mean AUROC >= {g['mean_auroc']} and every finding >= {g.get('min_finding_auroc', 0):.2f} "
              f"within {b['minutes']:g} CPU-minutes: **{'met' if g['met'] else 'NOT met'}** (best mean "
              f"{g['best']:.3f}; weakest finding: {worst}).",
              "", f"Training curves: `{result['figure']}`", "", f"Command: `{result['command']}`"]
    t = result["timings"]
    lines.append("Step timings (wall s / CPU s): " + ", ".join(f"{k} {x['wall_s']:.0f}/{x['cpu_s']:.0f}"
                                                                for k, x in t.items()))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--work_dir", type=Path, default=None, help="where data, runs and the figure go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_learning_ctclip_"))
    try:
        result = run(args, work)
    except SetupError as e:
        log.error("%s", e)
        return 2
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0  # a missed goal is a result, not a failure: the report says it


if __name__ == "__main__":
    sys.exit(main())

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
-> the report-prototype diagnostic (benchmarks/bench_learning_ctclip_prototypes.py: the same embeddings
scored without prompts, so the gap between the joint space and the prompts shows; and a linear probe on the
frozen volume embeddings, which shows what the image side carries at all) -> a training-curve figure from
both train_log.jsonl files.

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
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `scripts` importable like the tests do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# building the data set, and the report with its figure, live beside this module
from benchmarks.bench_learning_ctclip_data import (  # noqa: E402
    ROOT,
    SetupError,
    Timer,
    build_data,
    check_sides,
    check_split,
    import_scripts,
)
from benchmarks.bench_learning_ctclip_prototypes import embedding_probe_aurocs, prototype_aurocs  # noqa: E402
from benchmarks.bench_learning_ctclip_report import VARIANT_NAMES, machine, plot_curves, read_log, report  # noqa: E402

CONFIGS = ROOT / "configs" / "ctclip"
VARIANTS = ("e2e", "cached")
VARIANT_FLAGS = {"e2e": [], "cached": ["--freeze_dinov2", "--cache_features"]}

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


def train_variant(args: argparse.Namespace, variant: str, data: Path, out: Path, templates: str) -> tuple[list[str], dict]:
    """ctclip_train.py in this process; returns (argv, the summary line's dict)."""
    import_scripts()
    from ctclip.models.factory import ModelChoice
    from ctclip.run.train import TrainConfig, train
    from ctcore.cli import parse_args, to_config
    from scripts.ctclip_train import build_parser

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
    cfg = to_config(TrainConfig, targs, model=to_config(ModelChoice, targs).resolve())
    return argv, train(cfg)


def evaluate_variant(args: argparse.Namespace, data: Path, run_dir: Path, out: Path, templates: str) -> dict:
    from ctclip.run.evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(model_path=run_dir / "latest.pt", test_data=data / "valid_volumes.h5",
                               test_labels=data / "test_predicted_labels.csv", output_dir=out,
                               templates=templates, n_bootstrap=args.ctclip_n_bootstrap, num_workers=0,
                               device="cpu"))


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
        with Timer() as t:
            prototypes = prototype_aurocs(run_dir / "latest.pt", data)
        timings[f"prototypes_{variant}"] = t.as_dict()
        with Timer() as t:
            embedding_probe = embedding_probe_aurocs(run_dir / "latest.pt", data)
        timings[f"embedding_probe_{variant}"] = t.as_dict()
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
            "test": _test_result(ev, prototypes, embedding_probe, work_dir / f"eval_{variant}" / "summary.json"),
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


def _test_result(ev: dict[str, Any], prototypes: dict[str, dict[str, float]], embedding_probe: dict[str, float],
                 summary: Path) -> dict[str, Any]:
    """One variant's test-side results: zero-shot (the evaluation's), the report-prototype diagnostic on the test
    volumes and on the test reports' own text embeddings, and the linear probe on the frozen volume embeddings."""
    import pandas as pd

    table = pd.read_csv(ev["outputs"]["metrics"])
    per_finding = {str(r["finding"]): float(r["auroc"]) for _, r in table.iterrows() if pd.notna(r["auroc"])}
    return {"mean_auroc": ev["macro"]["auroc"], "n_units": ev["n_units"], "unit": ev["unit"],
            "per_finding_auroc": per_finding,
            **{key: {"mean": float(np.mean(list(p.values()))), "per_finding": p}
               for key, p in (("report_prototype_auroc", prototypes["volumes"]),
                              ("report_text_auroc", prototypes["reports"]),
                              ("embedding_probe_auroc", embedding_probe)) if p},
            "summary": str(summary), "roc_figure": ev["outputs"]["roc_curves"]}


def _count_rows(path: Path) -> int:
    import pandas as pd

    return int(len(pd.read_csv(path, usecols=["VolumeName"])))


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

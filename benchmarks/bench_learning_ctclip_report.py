"""Learning benchmark, chest half (benchmarks/bench_learning_ctclip.py): the result's Markdown report,
the training-curve figure and the machine description.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

VARIANT_NAMES = {"e2e": "end-to-end", "cached": "frozen backbone + feature cache"}


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
        proto = v["test"].get("report_prototype_auroc")
        if proto:
            per = ", ".join(f"{k} {x:.2f}" for k, x in proto["per_finding"].items())
            lines.append(f"- {v['name']}, the same embeddings scored by report prototypes instead of prompts "
                         f"(bench_learning_ctclip_prototypes.py; a diagnostic, it uses the training labels): mean "
                         f"{proto['mean']:.3f}; {per}")
        text = v["test"].get("report_text_auroc")
        if text:
            per = ", ".join(f"{k} {x:.2f}" for k, x in text["per_finding"].items())
            lines.append(f"- {v['name']}, the test reports' own text embeddings along the same directions (what the "
                         f"text tower tells apart): mean {text['mean']:.3f}; {per}")
        probe = v["test"].get("embedding_probe_auroc")
        if probe:
            per = ", ".join(f"{k} {x:.2f}" for k, x in probe["per_finding"].items())
            lines.append(f"- {v['name']}, a linear probe on the frozen volume embeddings (what the image side carries "
                         f"at all; a diagnostic, fitted on the training labels): mean {probe['mean']:.3f}; {per}")
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

"""The last step of `make demo`: the key numbers of both pipelines and the path of every output.

    python scripts/demo_summary.py --demo_dir demo_output [--started UNIX_SECONDS] [--json demo_output/summary.json]

Reads only files the demo's steps wrote (JSON, CSV, JSONL): the chest CLIP's training log and zero-shot
summary; the hemorrhage evaluations of the held-out studies by the CNN alone (hemorrhage_eval_cnn/) and by
CNN + sequence head (hemorrhage_eval/), side by side, and the heads' training logs. Folders of many inputs
(NIfTI volumes, DICOM trees, feature files) are listed as one line with their file count. Exit status 2
when an expected output is missing: the demo did not finish.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

# folders whose files are inputs or intermediates: one line each with the file count
BULK = ("volumes", "masks", "dicom", "truth", "tensorboard", "features", "prepared")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", type=Path, default=Path("demo_output"))
    p.add_argument("--started", type=float, default=None, help="UNIX time the demo started: prints the total time")
    p.add_argument("--json", type=Path, default=None, help="also write the key numbers here")
    return p


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the step that writes it did not finish)")
    return json.loads(path.read_text())


def _ci(d: dict, digits: int = 3) -> str:
    lo, hi = d.get("lower"), d.get("upper")
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else ""
    return f"{d['value']:.{digits}f}{ci}"


def _train_log(path: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return pd.DataFrame(rows)


def chest_numbers(demo: Path) -> dict:
    summary = _load(demo / "ctclip_eval" / "summary.json")
    log = _train_log(demo / "ctclip_train" / "train_log.jsonl")
    train = log[log.get("kind", pd.Series(dtype=str)) == "train"] if len(log) else log
    out = {"test_volumes": summary["n_units"], "macro_auroc": summary["macro"]["auroc"],
           "findings_in_macro": summary["macro"]["auroc"].get("n_findings"),
           "excluded_findings": len(summary.get("excluded_findings", []))}
    if len(train):
        out.update(train_steps=int(train["step"].max()), first_loss=float(train["loss"].iloc[0]),
                   last_loss=float(train["loss"].iloc[-1]))
    return out


# the two hemorrhage evaluations of the held-out studies: (key, label, folder under the demo folder)
HEAD_RUNS = (("cnn", "CNN alone", "hemorrhage_eval_cnn"),
             ("cnn_sequence_head", "CNN + sequence head", "hemorrhage_eval"))


def _head_run(metrics: dict) -> dict:
    wll, prior = metrics["weighted_log_loss"], metrics["baseline"]["weighted_log_loss"]
    return {"weighted_log_loss": wll, "prior_weighted_log_loss": prior, "ratio_to_prior": wll["value"] / prior,
            "mean_auroc": metrics["mean_auroc"],
            "auroc": {k: v["auroc"] for k, v in metrics["per_class"].items() if v.get("auroc") is not None}}


def head_numbers(demo: Path) -> dict:
    """Both held-out evaluations (CNN alone, CNN + sequence head) and the heads' validation per fold."""
    metrics = {key: _load(demo / folder / "metrics.json") for key, _, folder in HEAD_RUNS}
    out: dict = {key: _head_run(m) for key, m in metrics.items()}
    m = metrics["cnn_sequence_head"]
    out.update(prior_weighted_log_loss=m["baseline"]["weighted_log_loss"],
               slices=m.get("matching", {}).get("n_slices_evaluated"),
               studies=m.get("bootstrap", {}).get("n_units"), ci=m.get("bootstrap", {}).get("ci"))
    folds = {}
    for path in sorted((demo / "hemorrhage_sequence").glob("train_log_*.jsonl")):
        log = _train_log(path)
        if len(log) and "val_weighted_log_loss" in log:
            best = log.loc[log["val_weighted_log_loss"].idxmin()]
            folds[path.stem.rsplit("_", 1)[1]] = {
                "best_epoch": int(best["epoch"]), "epochs": len(log),
                "val_weighted_log_loss": float(best["val_weighted_log_loss"]),
                "cnn_val_weighted_log_loss": float(best["cnn_val_weighted_log_loss"])}
    out["sequence_validation"] = folds
    return out


def head_lines(head: dict) -> list[str]:
    """The held-out scores of CNN alone and CNN + sequence head side by side, then the heads' validation."""
    ci = f"{head['ci']:.0%} CI" if head.get("ci") else "CI"
    where = (f"{head['studies']} held-out studies, {head['slices']} slices"
             if head.get("studies") and head.get("slices") else "held-out studies")
    rows = [("", f"weighted log loss [{ci}]", "ratio to prior", f"mean AUROC [{ci}]"),
            ("prevalence prior", f"{head['prior_weighted_log_loss']:.4f}", "1.00", "")]
    rows += [(label, _ci(head[key]["weighted_log_loss"], 4), f"{head[key]['ratio_to_prior']:.2f}",
              _ci(head[key]["mean_auroc"])) for key, label, _ in HEAD_RUNS]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"head CT hemorrhage (tiny CNN, synthetic studies; {where}; study bootstrap):"]
    lines += ["  " + "   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for key, label, _ in HEAD_RUNS:
        per_class = ", ".join(f"{k} {v:.2f}" for k, v in head[key]["auroc"].items())
        lines.append(f"  AUROC per class, {label}: {per_class}")
    n = head[HEAD_RUNS[0][0]]["mean_auroc"].get("n_classes")
    if n:
        lines.append(f"  (mean AUROC: over the {n} classes, any included, with both labels on held-out slices)")
    if head.get("sequence_validation"):
        folds = "; ".join(f"fold {k} {v['val_weighted_log_loss']:.4f} vs CNN alone "
                          f"{v['cnn_val_weighted_log_loss']:.4f} (epoch {v['best_epoch'] + 1} of {v['epochs']})"
                          for k, v in head["sequence_validation"].items())
        lines.append(f"  sequence heads, weighted log loss on their validation fold (out-of-fold CNN features): "
                     f"{folds}")
    return lines


def outputs(demo: Path) -> list[str]:
    """Every output under `demo`: files, and one line per bulk folder (with its file count)."""
    lines, seen = [], set()
    for path in sorted(demo.rglob("*")):
        rel = path.relative_to(demo)
        bulk = next((i for i, part in enumerate(rel.parts[:-1]) if part in BULK), None)
        if bulk is not None:
            folder = demo.joinpath(*rel.parts[:bulk + 1])
            if folder not in seen:
                seen.add(folder)
                lines.append(f"{folder}/  ({sum(1 for f in folder.rglob('*') if f.is_file())} files)")
        elif path.is_file() and not path.name.startswith("."):
            lines.append(str(path))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    demo = args.demo_dir
    try:
        chest, head = chest_numbers(demo), head_numbers(demo)
    except FileNotFoundError as e:
        print(f"demo_summary: {e}", file=sys.stderr)
        return 2
    print("\n================ demo summary ================")
    print(f"chest 3D CLIP (tiny, synthetic CT-RATE): {chest.get('train_steps', '?')} training steps, "
          f"loss {chest.get('first_loss', float('nan')):.3f} -> {chest.get('last_loss', float('nan')):.3f}")
    print(f"  zero-shot macro AUROC on {chest['test_volumes']} held-out test volumes "
          f"({chest['findings_in_macro']} findings with both classes; 95% CI by patient): "
          f"{_ci(chest['macro_auroc'])}")
    for line in head_lines(head):
        print(line)
    if args.started is not None:
        print(f"total demo time: {(time.time() - args.started) / 60:.1f} min")
    print("\noutputs:")
    for line in outputs(demo):
        print(f"  {line}")
    if args.json is not None:
        args.json.write_text(json.dumps({"chest": chest, "head": head}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot evaluation of a trained 3D CLIP model on the 18 CT-RATE findings (seed: eval.py / zero_shot.py).

    # our protocol: percentile bootstrap CIs (1000 resamples of patients), Youden operating point
    python scripts/ctclip_eval.py --model_path runs/vitb/best.pt --test_data data/valid_volumes.h5 \\
        --test_labels data/ct_rate/test_predicted_labels.csv --reports data/ct_rate/test_reports.csv \\
        --output_dir runs/vitb/eval_test
    # the CT-CLIP reference code's numbers, for comparison with published tables
    python scripts/ctclip_eval.py ... --metric_protocol ctclip --output_dir runs/vitb/eval_test_ctclip
    # thresholds chosen on the validation split, applied to the test split
    python scripts/ctclip_eval.py ... --test_labels data/ct_rate/valid_predicted_labels.csv --output_dir runs/vitb/eval_valid
    python scripts/ctclip_eval.py ... --threshold file:runs/vitb/eval_valid/summary.json --output_dir runs/vitb/eval_test

Outputs in --output_dir: scores.csv (P(present)), logits.csv (what the metrics rank by), metrics_per_finding.csv, summary.json, roc_curves.png and, with
--reports, retrieval.json (see ctclip/run/eval_outputs.py). Exit status: 0 done, 2 bad input (the message
names the file, column, volume or flag).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctclip.checkpoint import CheckpointError
from ctclip.data.reports import TableError
from ctclip.run.evaluate import EvalConfig, EvalError, evaluate
from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.precision import CHOICES as PRECISION_CHOICES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_path", type=Path, required=True, help="training checkpoint (best.pt / latest.pt of ctclip_train.py)")
    a("--test_data", type=Path, required=True, help="HDF5 store holding the test volumes (ctclip_preprocess.py)")
    a("--test_labels", type=Path, required=True, help="labels CSV: VolumeName + the 18 findings (0/1/empty)")
    a("--output_dir", type=Path, default=Path("runs/ctclip_eval"))
    a("--reports", type=Path, default=None, help="reports CSV of the test volumes: adds report<->volume retrieval")
    a("--text_column", default=None, help="report text for retrieval (default: the one the model was trained on)")
    a("--templates", default="ctclip",
      help="prompt templates: a preset (ctclip: '{} is present.'/'{} is not present.' with the model's scale, "
           "CT-CLIP's; seed: '{}'/'no {}' with unscaled cosines, the seed's validation; ensemble) or a YAML/JSON/"
           "text file (see ctclip/zeroshot.py)")
    a("--metric_protocol", choices=["standard", "ctclip"], default="standard",
      help="standard: real bootstrap CIs, binary F1; ctclip: the CT-CLIP reference code's numbers (no resampling)")
    a("--threshold", default=None,
      help="operating point: youden | ctclip | fixed:<p> | file:<summary.json of a validation run> "
           "(default: youden; ctclip under --metric_protocol ctclip)")
    a("--n_bootstrap", type=int, default=1000)
    a("--ci", type=float, default=0.95)
    a("--bootstrap_seed", type=int, default=0)
    a("--bootstrap_unit", choices=["patient", "unit"], default="patient",
      help="resample patients (all their volumes together: CT-RATE has several per patient) or single units")
    a("--stratified", action="store_true", help="resample positives and negatives separately (with --bootstrap_unit unit)")
    a("--aggregate", choices=["volume", "scan"], default="volume",
      help="scan: max over the reconstructions of each scan (the CT-CLIP paper counted scans)")
    a("--allow_missing", action="store_true", help="evaluate even if some labelled volumes are not in the store")
    a("--batch_size", type=int, default=4)
    a("--num_workers", type=int, default=2)
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--precision", choices=PRECISION_CHOICES, default="auto",
      help="auto: bf16 autocast on GPU, fp32 on CPU; bf16 | fp16 | fp32 (none, off)")
    a("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    try:
        summary = evaluate(to_config(EvalConfig, args))
    except (EvalError, CheckpointError, TableError, FileNotFoundError, ValueError) as e:
        logging.getLogger("ctclip_eval").error("%s", e)
        return 2
    m = summary["macro"]["auroc"]
    ci = (f" [{m['lower']:.3f}, {m['upper']:.3f}] ({100 * summary['ci']:.0f}% CI, {summary['n_bootstrap']} "
          f"resamples by {summary['bootstrap_unit']})" if summary["n_bootstrap"] else " (no resampling: ctclip protocol)")
    print(f"zero-shot macro AUROC {m['value']:.3f}{ci} over {m['n_findings']} findings, {summary['n_units']} "
          f"{summary['unit']}s, {summary['protocol']} protocol")
    if summary["excluded_findings"]:
        print(f"left out (one class only): {', '.join(summary['excluded_findings'])}")
    if summary["retrieval"]:
        r = summary["retrieval"]
        print("retrieval R@1/5/10 volume->text " + "/".join(f"{r['volume_to_text'][f'R@{k}']:.3f}" for k in (1, 5, 10))
              + ", text->volume " + "/".join(f"{r['text_to_volume'][f'R@{k}']:.3f}" for k in (1, 5, 10)))
    print(f"ROC figure: {summary['outputs']['roc_curves']}")
    print(f"metrics: {summary['outputs']['metrics']}  summary: {args.output_dir / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the 3D CLIP model (seed: run_train.py).

    # one process (GPU if available, else CPU)
    python scripts/ctclip_train.py --ct_filepath data/train_volumes.h5 \\
        --txt_filepath data/ct_rate/train_reports.csv --batch_size 32 --epochs 40 --output_dir runs/vitb
    # several GPUs on one node
    torchrun --nproc_per_node=4 scripts/ctclip_train.py --use_ddp --ct_filepath ... --txt_filepath ...
    # a tiny model on CPU (tests, demo)
    python scripts/ctclip_train.py --config configs/ctclip/train_tiny.yaml --ct_filepath ... --txt_filepath ...

--batch_size is the global batch of one optimizer step (split over --grad_accum and the processes).
Exit status: 0 done, 2 when the run cannot start (bad inputs, incompatible checkpoint or weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ctclip.checkpoint import CheckpointError
from ctclip.data.reports import TableError
from ctclip.models.registry import model_config_from_yaml
from ctclip.run.train import SetupError, TrainConfig, train
from ctcore.cli import parse_args, setup_logging, to_config
from ctcore.distributed import read_launch_env
from ctcore.precision import CHOICES as PRECISION_CHOICES

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ctclip"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ct_filepath", type=Path, required=True, help="HDF5 store of training volumes (ctclip_preprocess.py)")
    a("--txt_filepath", type=Path, required=True, help="CT-RATE reports CSV")
    a("--output_dir", type=Path, default=Path("runs/ctclip"))
    a("--model_config", default="dinov2_vitb14",
      help="model architecture: a name (configs/ctclip/model_<name>.yaml: tiny, dinov2_vits14, ...) or a YAML path")
    a("--dinov2_model_name", default=None, help="slice encoder, overriding the model config (e.g. dinov2_vitl14_reg)")
    a("--dinov2_weights", default=None, help="local official DINOv2 .pth weights (e.g. dinov2_vitb14_pretrain.pth)")
    a("--dinov2_source", choices=["file", "hub"], default=None, help="hub: torch.hub (needs network)")
    a("--freeze_dinov2", action="store_true", help="freeze the slice encoder")
    a("--context_length", type=int, default=None, help="text context length (default from the model config: 77)")
    a("--slice_chunk", type=int, default=None, help="slices encoded per chunk (bounds memory)")
    a("--grad_checkpointing", action="store_true")
    a("--text_weights", default=None, help="local OpenAI CLIP weights to initialise the text tower")
    a("--batch_size", type=int, default=32, help="global batch per optimizer step")
    a("--epochs", type=int, default=40)
    a("--max_steps", type=int, default=None, help="train for this many optimizer steps (sets the schedule)")
    a("--stop_at_step", type=int, default=None,
      help="leave after this step, saving latest.pt, with the schedule of the full run (time-limited jobs; resume later)")
    a("--max_minutes", type=float, default=None,
      help="training budget in minutes of --budget_clock: stop there (saving latest.pt; validation not counted); "
           "the cosine schedule follows the budget, so the run ends at a low learning rate")
    a("--budget_clock", choices=["cpu", "wall"], default="cpu",
      help="cpu: CPU time of this process, user+sys over all its threads (use --num_workers 0); wall: elapsed time")
    a("--lr", type=float, default=1e-4)
    a("--weight_decay", type=float, default=0.2)
    a("--warmup_steps", type=int, default=500)
    a("--grad_accum", type=int, default=1, help="micro-batches per step; negatives still span the whole batch")
    a("--grad_clip", type=float, default=1.0)
    a("--precision", choices=PRECISION_CHOICES, default="bf16",
      help="autocast: bf16 | fp16 (CUDA, with a GradScaler) | fp32 (none, off) | auto (bf16 on CUDA, fp32 on CPU)")
    a("--num_workers", type=int, default=4)
    a("--seed", type=int, default=42)
    a("--save_interval", type=int, default=1000, help="steps between latest.pt checkpoints")
    a("--log_interval", type=int, default=10)
    a("--resume", default=None, help="a checkpoint path, or 'latest' (<output_dir>/latest.pt when present)")
    a("--text_column", default="findings_impressions",
      help="reports | findings | impressions | findings_impressions, or a CT-RATE column name")
    a("--sentence_keep", type=float, default=1.0,
      help="text augmentation: each time a report is drawn, keep each of its sentences with this probability "
           "(at least one); 1 = whole reports (seed behaviour). Helps a text tower trained from scratch")
    a("--slice_norm", choices=["minmax", "window"], default=None,
      help="slice intensities: minmax per slice, or window (the store's HU window kept); default from the model config")
    a("--cache_features", action="store_true", help="with --freeze_dinov2: compute slice embeddings once")
    a("--do_validate", action="store_true", help="zero-shot AUROC on the validation labels every --valid_interval")
    a("--valid_interval", type=int, default=200)
    a("--val_ct_filepath", type=Path, default=None)
    a("--val_label_path", type=Path, default=None)
    a("--val_templates", default="ctclip",
      help="zero-shot prompts of the validation: a preset (ctclip, seed, ensemble) or a template file (as ctclip_eval.py)")
    a("--use_ddp", action="store_true", help="distributed data parallel (run under torchrun or srun)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    a("--verbose", action="store_true")
    return p


def model_config(args: argparse.Namespace):
    path = Path(args.model_config)
    if not path.suffix:
        path = CONFIGS / f"model_{args.model_config}.yaml"
    cfg = model_config_from_yaml(path)
    overrides = {"slice_encoder": args.dinov2_model_name, "dinov2_weights": args.dinov2_weights,
                 "dinov2_source": args.dinov2_source, "context_length": args.context_length,
                 "slice_chunk": args.slice_chunk, "text_weights": args.text_weights, "slice_norm": args.slice_norm}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.freeze_dinov2:
        overrides["freeze_dinov2"] = True
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    return dataclasses.replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    try:
        cfg = to_config(TrainConfig, args, model=model_config(args))
        summary = train(cfg)
    except (SetupError, CheckpointError, TableError, FileNotFoundError, ValueError) as e:
        logging.getLogger("ctclip_train").error("%s", e)
        return 2
    launch = read_launch_env() if cfg.use_ddp else None
    if launch is None or launch.rank == 0:  # one summary line per run, not one per rank
        print(f"train: {json.dumps(summary)} -> {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Supervised probe of the 3D CLIP's image side on the learning benchmark's synthetic set: can the slice
encoder + fusion learn the 18 findings at all, from scratch, within a CPU budget? And a linear model on
pooled voxels beside it, the floor any image model should beat.

    python benchmarks/bench_probe_ctclip.py --data_dir DIR/ct_rate        # a set bench_learning_ctclip built
    python benchmarks/bench_probe_ctclip.py --work_dir DIR                # builds the set first (~8 min)
    python benchmarks/bench_probe_ctclip.py --data_dir DIR/ct_rate --arms pooled tiny_vit:minmax:cls \\
        tiny_cnn:minmax:max tiny_cnn:window:cls tiny_cnn:window:max tiny_cnn:window:mean \\
        tiny_cnn:window:max:h32 --minutes 3

Arms:
- `pooled`: the volumes average-pooled 4x4x4 (uint8 / 255, the stored HU window), one logistic
  regression per finding (sklearn, L2, C=0.1). No learning of features: what density and place alone give.
- `hist`: the share of each octant's voxels in each of 32 intensity bins (log-scaled, standardised), one
  logistic regression per finding (C=0.05). Also no learning of features: how much of each part of the
  volume is at each density, which is what a finding must change to be visible without shape.
- `hist_gran`: `hist`'s features and, per octant, the tiny_cnn granulometry shares (how much of each quadrant
  of a slice each grey opening by a 3x3, 5x5, 7x7 square removes by more than 100, 200, 400, 800 HU,
  averaged over the octant's slices; ctclip/models/morphology.py), one logistic regression per finding
  (C=0.05): density and the sizes of bright structures, still nothing learned.
- `ENCODER:NORM:POOL`: the project's own SliceEncoder (`tiny_cnn`, `tiny_vit`, any registered name) with
  `slice_norm` NORM (`window` | `minmax`), the project's SliceFusion, and a linear head of 18 logits;
  POOL is the fusion's pooling as the CLIP configures it (`fusion_pool`): `cls` its CLS token, `max`
  the maximum over the fused slice tokens; `mean` averages the fused slice tokens instead. Optional
  fields after POOL (tiny_cnn only): `hN` adds the encoder's intensity-histogram branch with N bins on a
  2 x 2 grid (`slice_hist_bins`, ctclip/models/tiny_cnn.py), `gM` its granulometry branch with M opening
  levels (`slice_gran_levels`, ctclip/models/morphology.py), e.g. `tiny_cnn:window:max:h32:g3`. Trained with
  BCE on the finding labels for --minutes of process CPU time (one torch thread by default), AdamW,
  batch --batch_size; scored on the held-out test side.

Each probe arm also reports the embedding collapse at initialisation: the mean cosine similarity between
the (untrained) volume embeddings of different test volumes. Near 1 means every volume starts as nearly
the same vector, and the contrastive loss must first pull them apart.

Prints a markdown table (macro and per-finding AUROC on the test side, steps, CPU minutes); --json writes
everything. Targets recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ctclip.data.augment import random_shift  # noqa: E402
from ctclip.data.store import VolumeStore  # noqa: E402
from ctclip.findings import FINDINGS  # noqa: E402
from ctclip.models.fusion import SliceFusion  # noqa: E402
from ctclip.models.morphology import residue_fractions  # noqa: E402
from ctclip.models.slice_encoder import build_slice_encoder  # noqa: E402

DEFAULT_ARMS = ("pooled", "hist", "tiny_cnn:window:max", "tiny_cnn:window:max:h32")
PROBE_POOLS = ("cls", "max", "mean")


def parse_arm(spec: str) -> tuple[str, str, str, int, int]:
    """ENCODER:NORM:POOL[:hN][:gM] -> (encoder, slice_norm, pool, histogram bins N, granulometry levels M; 0
    for a field not given)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4, 5) or parts[2] not in PROBE_POOLS:
        raise ValueError(f"arm {spec!r}: expected 'pooled', 'hist' or ENCODER:NORM:POOL[:hN][:gM] with POOL one of "
                         f"{PROBE_POOLS}")
    extra = {"h": 0, "g": 0}
    for field in parts[3:]:
        key = field[:1]
        if key not in extra or extra[key] or not (field[1:].isdigit() and int(field[1:]) > 0):
            raise ValueError(f"arm {spec!r}: the fields after POOL are hN (N > 0 histogram bins, e.g. h32) and gM "
                             "(M > 0 granulometry levels, e.g. g3), each at most once")
        if parts[0] != "tiny_cnn":
            raise ValueError(f"arm {spec!r}: histogram bins (hN) and granulometry (gM) are tiny_cnn settings")
        extra[key] = int(field[1:])
    return parts[0], parts[1], parts[2], extra["h"], extra["g"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data_dir", type=Path, default=None, help="a set built by bench_learning_ctclip.py (its ct_rate/ folder)")
    a("--work_dir", type=Path, default=None, help="build the learning benchmark's set here when --data_dir is not given")
    a("--arms", nargs="+", default=list(DEFAULT_ARMS))
    a("--minutes", type=float, default=3.0, help="CPU minutes of training per probe arm")
    a("--max_steps", type=int, default=None, help="stop each probe arm after this many steps (or the minutes)")
    a("--batch_size", type=int, default=32)
    a("--shift", type=int, default=0, help="augmentation: move each training volume by up to this many voxels "
                                          "in the axial plane (ctclip.data.augment; 0: none)")
    a("--lr", type=float, default=1e-3)
    a("--weight_decay", type=float, default=0.05)
    a("--image_size", type=int, default=64)
    a("--threads", type=int, default=1)
    a("--slice_chunk", type=int, default=64, help="slices per encoder forward (BatchNorm statistics are per chunk)")
    a("--seed", type=int, default=0)
    a("--eval_every", type=int, default=100, help="steps between test evaluations (the curve)")
    a("--json", type=Path, default=None)
    return p


# ---------------------------------------------------------------------------------------------- data


def load_side(store: Path, labels: Path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(N, 1, D, H, W) uint8 volumes, (N, 18) labels, names: the labelled volumes of the store."""
    for path in (store, labels):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    table = pd.read_csv(labels)
    if "VolumeName" not in table.columns:
        raise ValueError(f"{labels}: no column VolumeName")
    table = table.set_index("VolumeName")
    missing = [c for c in FINDINGS if c not in table.columns]
    if missing:
        raise ValueError(f"{labels}: no column(s) {missing}")
    with VolumeStore(store) as s:
        have = set(s.names())
        names = [n for n in table.index if n in have]
        if not names:
            raise ValueError(f"no volume of {labels} is in {store}")
        x = np.stack([s.read(n) for n in names])
    return torch.from_numpy(x).unsqueeze(1), table.loc[names, list(FINDINGS)].to_numpy(np.float32), names


def aurocs(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per-finding AUROC for the findings with both classes (the others are left out)."""
    from sklearn.metrics import roc_auc_score

    return {f: float(roc_auc_score(y[:, j], scores[:, j])) for j, f in enumerate(FINDINGS)
            if 0 < y[:, j].sum() < len(y)}


# ---------------------------------------------------------------------------------------------- arms


def regional_histograms(x: torch.Tensor, bins: int = 32, chunk: int = 128) -> np.ndarray:
    """(N, 1, D, H, W) uint8 -> (N, 8 * bins): the share of each octant's voxels (halves of each axis) in
    each of `bins` equal bins of the stored window, log(1 + 1000 * share)."""
    n, _, d, h, w = x.shape
    octant = ((np.arange(d) >= d // 2)[:, None, None] * 4 + (np.arange(h) >= h // 2)[None, :, None] * 2
              + (np.arange(w) >= w // 2)[None, None, :]).astype(np.int64) * bins
    size = np.bincount(octant.ravel() // bins, minlength=8).repeat(bins)
    out = np.zeros((n, 8 * bins))
    for i in range(0, n, chunk):
        v = x[i:i + chunk, 0].numpy().astype(np.int64) * bins // 256 + octant  # (B, D, H, W) cell index
        k = len(v)
        flat = (np.arange(k)[:, None] * 8 * bins + v.reshape(k, -1)).ravel()
        out[i:i + k] = np.bincount(flat, minlength=k * 8 * bins).reshape(k, -1) / size
    return np.log1p(1000.0 * out)


def regional_granulometry(x: torch.Tensor, levels: int = 3, chunk: int = 64) -> np.ndarray:
    """(N, 1, D, H, W) uint8 -> (N, 2 * levels * thresholds * 4): the tiny_cnn granulometry shares
    (`ctclip.models.morphology.residue_fractions`, quadrants of each slice) averaged over each half of the
    slices, so per octant; log(1 + 1000 * share)."""
    n, _, d, h, w = x.shape
    out = []
    for i in range(0, n, chunk):
        v = x[i:i + chunk, 0].float() / 127.5 - 1.0  # the encoder's input for slice_norm "window"
        k = len(v)
        shares = residue_fractions(v.reshape(k * d, h, w), levels, 2).view(k, d, -1)
        halves = torch.stack([shares[:, :d // 2].mean(1), shares[:, d // 2:].mean(1)], dim=1)
        out.append(halves.flatten(1).numpy())
    return np.log1p(1000.0 * np.concatenate(out))


def logistic_baseline(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray, c: float,
                      t0: float) -> dict[str, Any]:
    """One logistic regression per finding (sklearn, L2, C=`c`) on fixed features; scored on the test side."""
    from sklearn.linear_model import LogisticRegression

    scores = np.zeros((len(fte), len(FINDINGS)))
    for j in range(len(FINDINGS)):
        if 0 < ytr[:, j].sum() < len(ytr):
            scores[:, j] = LogisticRegression(C=c, max_iter=3000).fit(ftr, ytr[:, j]).decision_function(fte)
    return {"per_finding": aurocs(yte, scores), "cpu_minutes": (time.process_time() - t0) / 60,
            "features": int(ftr.shape[1])}


def histogram_baseline(xtr: torch.Tensor, ytr: np.ndarray, xte: torch.Tensor, yte: np.ndarray) -> dict[str, Any]:
    """The octants' intensity histograms, standardised (C=0.05): how much of each part of the volume is at
    each density, where nothing is learned about shape."""
    from sklearn.preprocessing import StandardScaler

    t0 = time.process_time()
    scaler = StandardScaler().fit(ftr := regional_histograms(xtr))
    return logistic_baseline(scaler.transform(ftr), ytr, scaler.transform(regional_histograms(xte)), yte, 0.05, t0)


def histogram_granulometry_baseline(xtr: torch.Tensor, ytr: np.ndarray, xte: torch.Tensor, yte: np.ndarray
                                    ) -> dict[str, Any]:
    """The octants' intensity histograms and granulometry shares, standardised (C=0.05): how much of each part
    of the volume is at each density, and how much bright structure of each size it holds."""
    from sklearn.preprocessing import StandardScaler

    t0 = time.process_time()
    feats = lambda x: np.hstack([regional_histograms(x), regional_granulometry(x)])  # noqa: E731
    scaler = StandardScaler().fit(ftr := feats(xtr))
    return logistic_baseline(scaler.transform(ftr), ytr, scaler.transform(feats(xte)), yte, 0.05, t0)


def pooled_baseline(xtr: torch.Tensor, ytr: np.ndarray, xte: torch.Tensor, yte: np.ndarray) -> dict[str, Any]:
    """The volumes average-pooled 4x4x4 (C=0.1): density and place."""
    t0 = time.process_time()
    feats = lambda x: F.avg_pool3d(x.float(), 4).flatten(1).numpy() / 255.0  # noqa: E731
    return logistic_baseline(feats(xtr), ytr, feats(xte), yte, 0.1, t0)


BASELINES = {"pooled": pooled_baseline, "hist": histogram_baseline, "hist_gran": histogram_granulometry_baseline}


class Probe(nn.Module):
    """Slice encoder -> fusion -> (CLS or mean of the fused tokens) -> 18 logits."""

    def __init__(self, encoder: str, slice_norm: str, pool: str, image_size: int, chunk: int = 64, hist_bins: int = 0,
                 gran_levels: int = 0):
        super().__init__()
        self.encoder = build_slice_encoder(encoder, image_size=image_size, slice_norm=slice_norm, chunk=chunk,
                                           hist_bins=hist_bins, gran_levels=gran_levels)
        self.fusion = SliceFusion(self.encoder.width, 64, 1, 2, 64, pool="cls" if pool == "mean" else pool)
        self.pool = pool
        self.head = nn.Linear(64, len(FINDINGS))

    def embed(self, volumes: torch.Tensor) -> torch.Tensor:
        tokens = self.fusion.tokens(self.encoder(volumes))
        return self.fusion.head(tokens[:, 1:].mean(dim=1) if self.pool == "mean" else self.fusion.pool(tokens))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(volumes))


def _batched(fn, x: torch.Tensor, size: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


def init_collapse(model: Probe, x: torch.Tensor) -> float:
    """Mean cosine similarity of the volume embeddings of different volumes (off-diagonal)."""
    z = F.normalize(_batched(model.embed, x).float(), dim=-1)
    sim = z @ z.T
    n = len(z)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def train_probe(spec: str, xtr, ytr, xte, yte, args: argparse.Namespace) -> dict[str, Any]:
    encoder, slice_norm, pool, hist_bins, gran_levels = parse_arm(spec)
    torch.manual_seed(args.seed)
    model = Probe(encoder, slice_norm, pool, args.image_size, args.slice_chunk, hist_bins, gran_levels)
    model.eval()
    collapse = init_collapse(model, xte[:64])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    known = torch.from_numpy((0 < ytr.sum(0)) & (ytr.sum(0) < len(ytr))).float()
    rng = np.random.default_rng(args.seed)
    shift_rng = np.random.default_rng([args.seed, 1])  # its own stream: the same batches with or without shifts
    curve: list[dict[str, float]] = []
    step, t0 = 0, time.process_time()

    def score() -> dict[str, float]:
        model.eval()
        out = aurocs(yte, _batched(model, xte).numpy())
        model.train()
        return out

    spent = 0.0  # training CPU seconds (evaluations not counted)
    while spent < args.minutes * 60 and (args.max_steps is None or step < args.max_steps):
        t_step = time.process_time()
        idx = rng.choice(len(xtr), args.batch_size, replace=False)
        batch = xtr[idx]  # a copy (fancy indexing): shifting it leaves the training set as it is
        if args.shift:
            for v in batch.numpy():
                random_shift(v, args.shift, shift_rng)
        logits = model(batch)
        loss = (F.binary_cross_entropy_with_logits(logits, torch.from_numpy(ytr[idx]), reduction="none")
                * known).sum(1).mean() / known.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        spent += time.process_time() - t_step
        if step % args.eval_every == 0:
            per = score()
            curve.append({"step": step, "cpu_minutes": spent / 60, "loss": float(loss.detach()),
                          "macro": float(np.mean(list(per.values())))})
            print(f"  {spec} step {step} cpu {spent / 60:.2f} min loss {curve[-1]['loss']:.3f} "
                  f"test macro {curve[-1]['macro']:.3f}", flush=True)
    per = score()
    return {"per_finding": per, "steps": step, "cpu_minutes": spent / 60, "init_collapse": collapse, "curve": curve,
            "total_cpu_minutes": (time.process_time() - t0) / 60}


# ---------------------------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> str:
    arms = result["arms"]
    lines = ["### Supervised probe of the image side (synthetic chest CT, held-out test patients)", "",
             f"- date {result['date']}; {result['n_train']} training volumes, {result['n_test']} test volumes; "
             f"{result['minutes']:g} CPU-minutes per probe arm, torch threads {result['threads']}", "",
             "| arm | macro AUROC | min finding | steps | CPU min | init cosine |", "|---|---|---|---|---|---|"]
    for name, r in arms.items():
        per = r["per_finding"]
        worst = min(per, key=per.get)
        lines.append(f"| `{name}` | {np.mean(list(per.values())):.3f} ({len(per)} findings) | {worst} {per[worst]:.2f} | "
                     f"{r.get('steps', '-')} | {r['cpu_minutes']:.2f} | "
                     f"{r['init_collapse']:.3f} |" if "init_collapse" in r else
                     f"| `{name}` | {np.mean(list(per.values())):.3f} ({len(per)} findings) | {worst} {per[worst]:.2f} | "
                     f"- | {r['cpu_minutes']:.2f} | - |")
    lines += ["", "Per finding (test AUROC):", "", "| finding | " + " | ".join(f"`{a}`" for a in arms) + " |",
              "|---|" + "---|" * len(arms)]
    for f in FINDINGS:
        cells = [f"{arms[a]['per_finding'][f]:.2f}" if f in arms[a]["per_finding"] else "-" for a in arms]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shift < 0:  # refused before any work, as the arms below
        print(f"error: --shift must be >= 0, got {args.shift}", file=sys.stderr)
        return 2
    for arm in args.arms:
        try:
            if arm not in BASELINES:
                parse_arm(arm)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    data = args.data_dir
    if data is None:
        if args.work_dir is None:
            print("give --data_dir (a built set) or --work_dir (to build one)", file=sys.stderr)
            return 2
        from benchmarks.bench_learning_ctclip import add_arguments, build_data

        bp = argparse.ArgumentParser()
        add_arguments(bp)
        data = args.work_dir / "ct_rate"
        build_data(bp.parse_args([]), data, {})
    try:
        xtr, ytr, _ = load_side(data / "train_volumes.h5", data / "train_predicted_labels.csv")
        xte, yte, _ = load_side(data / "valid_volumes.h5", data / "test_predicted_labels.csv")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train {tuple(xtr.shape)}, test {tuple(xte.shape)}", flush=True)
    arms: dict[str, Any] = {}
    for arm in args.arms:
        baseline = BASELINES.get(arm)
        arms[arm] = baseline(xtr, ytr, xte, yte) if baseline else train_probe(arm, xtr, ytr, xte, yte, args)
        print(f"{arm}: macro {np.mean(list(arms[arm]['per_finding'].values())):.3f}", flush=True)
    result = {"benchmark": "ctclip_probe", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "data_dir": str(data), "n_train": len(xtr), "n_test": len(xte), "minutes": args.minutes,
              "threads": args.threads, "arms": arms}
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

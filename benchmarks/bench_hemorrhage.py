"""Benchmark: hemorrhage inference on a synthetic head CT study, the original's PNG path vs ours (streaming).

    python benchmarks/bench_hemorrhage.py              # the published ensemble's architectures, 1 fold, 1 study of
                                                    # 24 slices at 512x512: ~5-7 min on 2 CPU cores
    python benchmarks/bench_hemorrhage.py --models tiny_densenet=64 --slices 16   # quick plumbing check, ~20 s
    python benchmarks/bench_hemorrhage.py --device cuda --batch_size 64           # on a GPU, adds bf16/channels_last vs fp32

One run, the same DICOM study (scripts/hemorrhage_make_synthetic.py with configs/hemorrhage/synthetic_small.yaml,
--n_studies/--size/--slices, no broken files; a localizer, when drawn, is left out) and the same randomly
initialised weights in the published layout (hemorrhage.models.checkpoint.save_random_weights):
  (a) PNG path   the original's: hemorrhage.run.prepare.run_prepare writes one windowed PNG per slice; then, per
                 model input size (the original predicted each member separately), a DataLoader over the
                 slices in manifest order reads [s+1, s, s-1] with cv2.imread, resizes each, centre crop 0.8
                 resized back, normalises to float32 in the worker; every fold model of the members of
                 that size runs on each float batch (channels_last/autocast as CNNEnsemble)
  (b) ours       hemorrhage.run.inference.run_inference: series decoded, windowed and resized in DataLoader
                 workers, uint8 to the device; per study = discover + wait_for_data + cnn + sequence + write
                 (weight check and model loading are one-off costs shared by every path, shown apart);
                 (b0) the same with num_workers 0: no header-reader pool, no DataLoader workers (the pool's
                 forkserver workers import the main script, torch included: seconds per pool on 2 cores)
  (c) compute    CNNEnsemble.predict alone on pre-made uint8 inputs already on the device
  (d) decode     per slice, one process, files read once before (page cache): pydicom .pixel_array vs
                 hemorrhage.inputs.slice_image (decode, HU with the BitsStored-12 fix, window, min-max uint8)
  (e) CUDA only  model compute (as c) in bf16 + channels_last vs fp32 without channels_last
(a)-(c) run --repeats times (interleaved) after one untimed warm-up batch; medians are reported. Targets:
ours / compute <= 1.1, PNG path / ours > 1 (ours faster), decode+window / pydicom decode <= 1.5.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import torch
from torch.utils.data import DataLoader, Dataset

from ctcore.cli import parse_args
from hemorrhage.augment import center_crop_resize
from hemorrhage.classes import CLASSES
from hemorrhage.cnn_run import parse_input_sizes
from hemorrhage.ensemble import CNNEnsemble, resolve_amp, resolve_device
from hemorrhage.inference_data import SeriesInputs, find_series
from hemorrhage.inputs import InputSettings, parse_tta, slice_image
from hemorrhage.models.checkpoint import SEED_ENSEMBLE, check_weights, save_random_weights
from hemorrhage.models.sequence_checkpoint import member_label
from hemorrhage.run.inference import InferConfig, run_inference
from hemorrhage.run.prepare import PrepareConfig, run_prepare
from hemorrhage.series import resolve_workers
from hemorrhage.windows import parse_window_spec

ROOT = Path(__file__).resolve().parents[1]
OURS_PARTS = ("discover", "wait_for_data", "cnn", "sequence", "write")  # per study; the rest is one-off


def parse_member(text: str) -> tuple[str, int]:
    name, _, size = text.rpartition("=")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARCHITECTURE=SIZE, e.g. DenseNet121_change_avg=512")
    return name, int(size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"cpu": cpu, "cores": resolve_workers(-1), "torch": torch.__version__, "device": name,
            "python": platform.python_version(), "load_avg_1min": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------------------- inputs


def make_study(out: Path, args: argparse.Namespace) -> Path:
    """The synthetic DICOM study set; returns its dicom/ folder."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.hemorrhage_make_synthetic import main as make_synthetic

    rc = make_synthetic(["--config", str(ROOT / "configs/hemorrhage/synthetic_small.yaml"), "--out_dir", str(out),
                         "--n_studies", str(args.n_studies), "--size", str(args.size), "--slices", str(args.slices),
                         "--broken", "0", "--seed", str(args.seed), "--overwrite"])
    if rc:
        raise SystemExit(f"hemorrhage_make_synthetic failed (exit {rc})")
    return out / "dicom"


def load_ensemble(weights: Path, args: argparse.Namespace, device: torch.device) -> CNNEnsemble:
    inv = check_weights(weights, folds=args.folds)
    inv.raise_if_problems()
    sizes = parse_input_sizes(args.input_size, [member_label((m.name, m.image_size)) for m in inv.models])
    return CNNEnsemble.load(inv, device, resolve_amp("auto", device), input_sizes=sizes)


def device_inputs(dicom: Path, ens: CNNEnsemble, workers: int) -> tuple[dict[int, torch.Tensor], list[str]]:
    """uint8 (1, S, 3, size, size) per input size, every series concatenated, on the device (as run_group),
    and the slice files in the same order."""
    jobs, _ = find_series(dicom, num_workers=workers, progress=False)
    ds = SeriesInputs(jobs, InputSettings(parse_window_spec("header"), ens.sizes, tta=parse_tta("0")))
    items = [ds[i] for i in range(len(ds))]
    inputs = {s: torch.cat([it["inputs"][s] for it in items], 1).to(ens.device) for s in ens.sizes}
    return inputs, [p for j in jobs for p in j.paths]


# ---------------------------------------------------------------------------------------------- (a) PNG path


class PngSlices(Dataset):
    """The original's per-slice dataset: [s+1, s, s-1] PNGs -> resize -> crop 0.8 -> float32 normalised."""

    def __init__(self, series: list[list[str]], size: int) -> None:
        self.series, self.size = series, size
        self.index = [(i, s) for i, paths in enumerate(series) for s in range(len(paths))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> torch.Tensor:
        i, s = self.index[k]
        paths = self.series[i]
        images = []
        for j in (min(s + 1, len(paths) - 1), s, max(s - 1, 0)):
            img = cv2.imread(paths[j], cv2.IMREAD_GRAYSCALE)
            images.append(cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_LINEAR))
        x = center_crop_resize(np.stack(images, -1), 0.8)
        x = (x.astype(np.float32) / 255.0 - 0.456) / 0.224  # albumentations Normalize, in the worker
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def manifest_series(prepared: Path) -> tuple[list[list[str]], list[str]]:
    """PNG paths per series in slice order, and the SOP UIDs in the same order, from prepare's manifest."""
    m = pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False)
    m = m[(m["included"] == "1") & (m["output"] != "")].assign(order_i=lambda d: d["order"].astype(int))
    series, sops = [], []
    for _, g in m.groupby("SeriesInstanceUID", sort=False):
        g = g.sort_values("order_i")
        series.append([str(prepared / o) for o in g["output"]])
        sops += g["SOPInstanceUID"].tolist()
    return series, sops


def run_png_path(dicom: Path, out: Path, ens: CNNEnsemble, workers: int, batch: int) -> dict:
    t0 = time.perf_counter()
    run_prepare(PrepareConfig(dicom, out, format="png", num_workers=workers, progress=False))
    t1 = time.perf_counter()
    series, sops = manifest_series(out)
    probs: dict[str, list[list[torch.Tensor]]] = {m.label: [[] for _ in m.models] for m in ens.members}
    for size in ens.sizes:
        loader = DataLoader(PngSlices(series, size), batch_size=batch, shuffle=False, num_workers=workers,
                            pin_memory=ens.device.type == "cuda")
        for x in loader:
            x = x.to(ens.device, non_blocking=True)
            if ens.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                for m in (m for m in ens.members if m.input_size == size):
                    for f, model in enumerate(m.models):
                        with ens.autocast():
                            probs[m.label][f].append(torch.sigmoid(model(x).float()).cpu())
    sync(ens.device)
    t2 = time.perf_counter()
    mean = np.mean([np.mean([torch.cat(p).numpy() for p in per_fold], 0) for per_fold in probs.values()], 0)
    return {"prepare": t1 - t0, "predict": t2 - t1, "total": t2 - t0, "probs": pd.DataFrame(mean, sops, CLASSES)}


# ---------------------------------------------------------------------------------------------- (b), (c), (d), (e)


def run_ours(dicom: Path, weights: Path, out: Path, args: argparse.Namespace, device: torch.device,
             workers: int) -> dict:
    cfg = InferConfig(data_dir=dicom, output=out / "predictions.csv", weights_dir=weights, folds=args.folds,
                      num_workers=workers, batch_size=args.batch_size, device=str(device), progress=False,
                      input_size=args.input_size)
    summary = run_inference(cfg)
    t = dict(summary.timings)
    t["per_study"] = sum(t[k] for k in OURS_PARTS)
    per_slice = pd.read_csv(summary.files["per_slice"], dtype={"SOPInstanceUID": str})
    return {"timings": t, "n_slices": summary.n_slices, "failed": len(summary.failed),
            "probs": per_slice.set_index("SOPInstanceUID")[list(CLASSES)]}


def time_compute(ens: CNNEnsemble, inputs: dict[int, torch.Tensor], batch: int) -> float:
    total = next(iter(inputs.values())).shape[1]
    sync(ens.device)
    t = time.perf_counter()
    for start in range(0, total, batch):
        ens.predict({s: x[:, start:start + batch] for s, x in inputs.items()})
    sync(ens.device)
    return time.perf_counter() - t


def time_decode(paths: list[str], repeats: int) -> dict[str, float]:
    """ms per slice (median over passes over every file): pydicom decode vs our decode + HU + window."""
    spec = parse_window_spec("header")
    for p in paths:
        Path(p).read_bytes()
    fns = {"pydicom": lambda p: pydicom.dcmread(p).pixel_array, "ours": lambda p: slice_image(p, spec)}
    out = {}
    for name, fn in fns.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for p in paths:
                fn(p)
            times.append(time.perf_counter() - t)
        out[name] = 1000 * statistics.median(times) / len(paths)
    return out


def precision_compare(ens: CNNEnsemble, inputs: dict[int, torch.Tensor], batch: int, repeats: int) -> dict:
    """CUDA: slices/s of the model compute in bf16 + channels_last vs fp32 in the default memory format."""
    n = next(iter(inputs.values())).shape[1] * len(ens.members)
    out = {}
    for label, amp, last in (("bf16 + channels_last", torch.bfloat16, True), ("fp32", None, False)):
        fmt = torch.channels_last if last else torch.contiguous_format
        for m in ens.members:  # CNNEnsemble's flag only changes the input; the weights follow it here
            m.models = [model.to(memory_format=fmt) for model in m.models]
        variant = CNNEnsemble(ens.members, ens.device, amp, channels_last=last)
        time_compute(variant, inputs, batch)  # warm-up (kernel selection)
        seconds = statistics.median(time_compute(variant, inputs, batch) for _ in range(max(3, repeats)))
        out[label] = {"seconds": seconds, "member_slices_per_s": n / seconds}
    for m in ens.members:
        m.models = [model.to(memory_format=torch.channels_last if ens.channels_last else torch.contiguous_format)
                    for model in m.models]
    return out


# ---------------------------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(r: dict, args: argparse.Namespace) -> None:
    m, n, st = r["machine"], r["n_slices"], r["n_studies"]
    print(f"\n# hemorrhage inference benchmark, {r['date']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}; 1-min load average "
          f"{r['load_start']} at the start, {m['load_avg_1min']} at the end (other work on the machine skews timings)")
    print(f"command: {r['command']}")
    print(f"input: {st} synthetic stud{'y' if st == 1 else 'ies'}, {r['n_files']} DICOM files -> {n} slices "
          f"({r['left_out']} left out), {args.size}x{args.size}, {r['transfer_syntaxes']}")
    print(f"members: {', '.join(r['members'])}; folds {args.folds}; {r['workers']} workers, batch {args.batch_size}, "
          f"amp {r['amp']}, channels_last {r['channels_last']}; median of {args.repeats} run(s)\n")
    a, b, c = r["png"], r["ours"], r["compute_s"]
    rows = [("(a) PNG path (original), end to end", a["total"]), ("    prepare: DICOM -> PNG files", a["prepare"]),
            ("    predict: PNG -> DataLoader -> model", a["predict"]), ("(b) ours, streaming, end to end", b["per_study"])]
    rows += [(f"    {k}", b[k]) for k in OURS_PARTS]
    rows += [("(b0) ours, in-process (num_workers 0), end to end", r["ours0"]["per_study"])]
    rows += [(f"    {k}", r["ours0"][k]) for k in OURS_PARTS] + [("(c) model compute alone", c)]
    print("| path | s / study | slices/s | vs (c) compute |")
    print("|---|---|---|---|")
    for label, sec in rows:
        print(f"| {label} | {sec / st:.3f} | {n / sec:.1f} | {sec / c:.2f} |")
    print(f"\none-off (ours, per run): check_weights {b['check_weights']:.2f} s, load_models {b['load_models']:.2f} s")
    d = r["decode_ms"]
    print("\n| (d) per slice, one process | ms |\n|---|---|")
    print(f"| pydicom dcmread().pixel_array | {d['pydicom']:.2f} |\n| ours slice_image (decode, HU, window) | "
          f"{d['ours']:.2f} |")
    if "precision" in r:
        print("\n| (e) model compute | s | member-slices/s |\n|---|---|---|")
        for label, v in r["precision"].items():
            print(f"| {label} | {v['seconds']:.3f} | {v['member_slices_per_s']:.1f} |")
    else:
        print("\n(e) bf16 + channels_last vs fp32: skipped (not CUDA)")
    t = r["ratios"]
    print(f"\nmax |p_PNG - p_ours| over slices and classes: {r['max_prob_diff']:.2e}")
    print(f"ours / model compute = {t['ours_over_compute']:.3f} (target <= 1.1: {verdict(t['ours_over_compute'] <= 1.1)})")
    print(f"PNG path / ours = {t['png_over_ours']:.2f} (target > 1: {verdict(t['png_over_ours'] > 1)})")
    print(f"decode+window / pydicom decode = {t['decode_ratio']:.2f} (target <= 1.5: "
          f"{verdict(t['decode_ratio'] <= 1.5)})")
    print(f"for reference, (b0) in-process: ours / model compute = {t['ours0_over_compute']:.3f}, "
          f"PNG path / ours = {t['png_over_ours0']:.2f}")
    if "bf16_speedup" in t:
        print(f"bf16 + channels_last / fp32 speed-up = {t['bf16_speedup']:.2f}x")
    print(f"\nbenchmark wall time {r['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=parse_member, default=list(SEED_ENSEMBLE),
                   help="ARCHITECTURE=SIZE members (default: the published three)")
    p.add_argument("--folds", nargs="+", type=int, default=[0])
    p.add_argument("--input_size", nargs="+", default=[], help="N or MEMBER=N, as hemorrhage_infer.py")
    p.add_argument("--n_studies", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="rows = columns of the synthetic images")
    p.add_argument("--slices", type=int, default=24,
                   help="slices of the thick series (at most; see the generator). 24, not a typical ~32: every path "
                        "runs the three CNNs over the study, ~3 s per slice on 2 CPU cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=-1, help="DataLoader/prepare workers (-1 = all CPUs)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of (a)-(c); the median is reported")
    p.add_argument("--decode_repeats", type=int, default=5, help="passes over the files in (d)")
    p.add_argument("--work_dir", type=Path, default=None, help="keep the study, weights and outputs here")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p


def run(work: Path, args: argparse.Namespace, device: torch.device) -> dict:
    dicom = make_study(work / "study", args)
    logging.getLogger("hemorrhage").setLevel(logging.WARNING)  # the generator set INFO on the root logger
    weights = work / "weights"
    shutil.rmtree(weights, ignore_errors=True)
    save_random_weights(weights, args.models, folds=args.folds, seed=0)
    ens = load_ensemble(weights, args, device)
    workers = resolve_workers(args.num_workers)
    inputs, files = device_inputs(dicom, ens, workers)
    ens.predict({s: x[:, :args.batch_size] for s, x in inputs.items()})  # warm-up, untimed
    sync(device)
    r: dict = {"decode_ms": time_decode(files, args.decode_repeats), "workers": workers}
    runs: dict[str, list] = {"png": [], "ours": [], "ours0": [], "compute": []}
    for i in range(args.repeats):
        runs["png"].append(run_png_path(dicom, work / f"png{i}", ens, workers, args.batch_size))
        runs["ours"].append(run_ours(dicom, weights, work / f"ours_pool{i}", args, device, workers))
        runs["ours0"].append(run_ours(dicom, weights, work / f"ours_inproc{i}", args, device, 0))
        runs["compute"].append(time_compute(ens, inputs, args.batch_size))
        shutil.rmtree(work / f"png{i}")
    r["png"] = {k: statistics.median(x[k] for x in runs["png"]) for k in ("prepare", "predict", "total")}
    for key in ("ours", "ours0"):
        r[key] = {k: statistics.median(x["timings"][k] for x in runs[key]) for k in runs[key][0]["timings"]}
    r["compute_s"] = statistics.median(runs["compute"])
    manifest = pd.read_csv(work / "ours_pool0" / "predictions_manifest.csv", dtype=str, keep_default_na=False)
    r["n_files"], r["n_slices"] = len(manifest), int((manifest["included"] == "1").sum())
    r["left_out"], r["n_studies"] = r["n_files"] - r["n_slices"], manifest["StudyInstanceUID"].nunique()
    if runs["ours"][0]["n_slices"] != r["n_slices"] or runs["ours"][0]["failed"]:
        raise RuntimeError(f"ours predicted {runs['ours'][0]['n_slices']} of {r['n_slices']} slices")
    p_png, p_ours = runs["png"][0]["probs"], runs["ours"][0]["probs"]
    r["max_prob_diff"] = float(np.abs(p_png.to_numpy() - p_ours.loc[p_png.index].to_numpy()).max())
    syntaxes = pd.Series([pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
                          for f in files]).value_counts()
    r["transfer_syntaxes"] = ", ".join(f"{k} {v}" for k, v in syntaxes.items())
    r["members"] = [f"{m.label} @ {m.input_size} px" for m in ens.members]
    r["amp"] = str(ens.amp).replace("torch.", "") if ens.amp else "none"
    r["channels_last"] = ens.channels_last
    r["ratios"] = {"ours_over_compute": r["ours"]["per_study"] / r["compute_s"],
                   "png_over_ours": r["png"]["total"] / r["ours"]["per_study"],
                   "decode_ratio": r["decode_ms"]["ours"] / r["decode_ms"]["pydicom"],
                   "ours0_over_compute": r["ours0"]["per_study"] / r["compute_s"],
                   "png_over_ours0": r["png"]["total"] / r["ours0"]["per_study"]}
    if device.type == "cuda":
        r["precision"] = precision_compare(ens, inputs, args.batch_size, args.repeats)
        r["ratios"]["bf16_speedup"] = (r["precision"]["bf16 + channels_last"]["member_slices_per_s"]
                                       / r["precision"]["fp32"]["member_slices_per_s"])
    return r


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    t0, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    device = resolve_device(args.device)
    command = "python benchmarks/bench_hemorrhage.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        r = run(args.work_dir, args, device)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_hemorrhage_") as tmp:
            r = run(Path(tmp), args, device)
    r.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), command=command.strip(),
             machine=machine(device), load_start=load_start, seconds=time.perf_counter() - t0)
    report(r, args)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

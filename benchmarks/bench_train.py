"""Benchmark: 3D CLIP training throughput and peak memory (CPU tiny model; GPU DINOv2 when present).

    python benchmarks/bench_train.py                       # about 3 minutes on 2 cores, no GPU
    python benchmarks/bench_train.py --gpu on --json out.json

CPU part, all in one run, one torch thread per process, a fresh process per variant, on a small
synthetic set (scripts/ctclip_make_synthetic.py -> scripts/ctclip_preprocess.py, 48x96x96 volumes),
training driven through `ctclip.run.train.train` with configs/ctclip/train_tiny.yaml (batch 8, fp32):
  frozen, no cache      frozen backbone, slice features recomputed every step
  frozen, cache         `cache_features`: the one-off cache build is timed separately, then epochs read it
  unfrozen, chunk N     slice encoder trained, N slices per backbone forward (small vs all in one)
  unfrozen, chunk N+ckpt  the same with gradient checkpointing per chunk
each for the tiny model as configured (56 px slices) and with 224 px slices (DINOv2's input size).
Volumes/s come from <output_dir>/train_log.jsonl (logged every step): batch / the median step time,
the first step left out as warm-up. Peak memory: peak RSS (VmHWM) above the process's RSS after imports, reset through
/proc/self/clear_refs, in a fresh process per variant (forked from a forkserver that imported ctclip
once), the feature cache build included for the cache variant (the log's `max_memory_mb` is the process's lifetime
ru_maxrss, imports included, so it is not used for the comparison).

GPU part (only with CUDA; --gpu auto|on|off): DINOv2 ViT-S/14 and ViT-B/14 (random init) at 160
slices of 224x224, frozen and unfrozen, bf16 autocast, synthetic uint8 volumes already on the device:
the largest power-of-two batch that fits, volumes/s, torch.cuda.max_memory_allocated and the model
FLOP utilisation = (FLOPs of one training step, forward + backward, from FlopCounterMode) x steps/s
/ the device's peak bf16 dense FLOP/s (--peak_tflops, or looked up from the device name).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctcore.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TINY = ROOT / "configs" / "ctclip" / "train_tiny.yaml"
VOLUME_SHAPE = (48, 96, 96)  # D H W of the synthetic store
GPU_SHAPE = (160, 224, 224)
# bf16 dense tensor-core peak, TFLOP/s (vendor data sheets); matched against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# (label, image_size or None = the tiny config's own, freeze, cache, slice_chunk or None = all slices, ckpt)
CPU_VARIANTS = [
    ("frozen, no cache", None, True, False, None, False),
    ("frozen, cache", None, True, True, None, False),
    ("unfrozen, chunk 8", None, False, False, 8, False),
    ("unfrozen, chunk all", None, False, False, None, False),
    ("unfrozen, chunk 8+ckpt", None, False, False, 8, True),
    ("frozen, no cache", 224, True, False, None, False),
    ("frozen, cache", 224, True, True, None, False),
    ("unfrozen, chunk 8", 224, False, False, 8, False),
    ("unfrozen, chunk all", 224, False, False, None, False),
    ("unfrozen, chunk 8+ckpt", 224, False, False, 8, True),
]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# ---------------------------------------------------------------------------------------------- data


def make_data(tmp: Path, n_patients: int) -> tuple[Path, Path]:
    """Synthetic CT-RATE set -> uint8 store of VOLUME_SHAPE; returns (store, reports CSV)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.ctclip_make_synthetic import main as make_synthetic
    from scripts.ctclip_preprocess import main as preprocess

    raw = tmp / "ct_rate"
    d, h, w = VOLUME_SHAPE
    make_synthetic(["--out_dir", str(raw), "--n_patients", str(n_patients), "--size", str(h), str(w),
                    "--slices", str(d), "--seed", "0", "--overwrite"])
    store = tmp / "train_volumes.h5"
    rc = preprocess(["--ct_data_path", str(raw / "volumes" / "train"), "--ct_out_path", str(store),
                     "--metadata_path", str(raw / "train_metadata.csv"), "--target_shape", str(d), str(h), str(w),
                     "--num_workers", "0"])
    if rc != 0:
        raise RuntimeError(f"preprocessing the synthetic set failed (exit {rc})")
    return store, raw / "train_reports.csv"


# ------------------------------------------------------------------------------------------ CPU part


def _train_config(spec: dict):
    """TrainConfig from configs/ctclip/train_tiny.yaml + the variant's model settings."""
    import yaml

    from ctclip.models.factory import get_model_config
    from ctclip.run.train import TrainConfig

    settings = yaml.safe_load(TRAIN_TINY.read_text())
    batch = settings["batch_size"]
    chunk = spec["chunk"] or batch * VOLUME_SHAPE[0]  # None: every slice of the batch in one chunk
    # image_size None: the architecture's own
    model = get_model_config(settings.pop("model_config"), freeze_dinov2=spec["freeze"], slice_chunk=chunk,
                             grad_checkpointing=spec["ckpt"], image_size=spec["image_size"])
    settings.update(log_interval=1, save_interval=10**9, num_workers=0, max_steps=spec["steps"])
    return TrainConfig(ct_filepath=Path(spec["store"]), txt_filepath=Path(spec["reports"]),
                       output_dir=Path(spec["out"]), model=model, cache_features=spec["cache"], **settings)


def run_cpu_variant(spec: dict) -> dict:
    """One training run in this (fresh) process; returns its numbers."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.stderr = open(f"{spec['out']}.stderr.txt", "w")  # noqa: SIM115  (progress bars; errors come back raised)
    torch.set_num_threads(spec["threads"])
    from ctclip.data.dataset import CTReportDataset
    from ctclip.feature_cache import build_feature_cache, cache_dir, cache_key
    from ctclip.models.factory import create_model
    from ctclip.run.train import train
    from ctcore.precision import autocast_factory

    cfg = _train_config(spec)
    features_root = cfg.ct_filepath.with_name(cfg.ct_filepath.name + ".features")
    shutil.rmtree(features_root, ignore_errors=True)  # the cache key does not change between runs
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base_kb = _rss_kb("VmRSS")
    out: dict = {}
    if cfg.cache_features:
        # what train() does first, timed on its own: same seed -> same weights -> same cache key,
        # so train() finds the cache complete and only reads it (checked below)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model)
        data = CTReportDataset(cfg.ct_filepath, cfg.txt_filepath, cfg.text_column)
        folder = cache_dir(cfg.ct_filepath, cache_key(model, cfg.ct_filepath))
        autocast, _ = autocast_factory(cfg.precision, torch.device("cpu"))
        t = time.perf_counter()
        build_feature_cache(model, data, folder, 0, 1, torch.device("cpu"), batch_size=cfg.batch_size,
                            num_workers=0, autocast=autocast)
        out["cache_build_s"] = time.perf_counter() - t
        out["cache_volumes"] = len(data)
        del model, data
    t = time.perf_counter()
    train(cfg)
    out["train_wall_s"] = time.perf_counter() - t
    out["peak_rss_growth_mb"] = (_rss_kb("VmHWM") - base_kb) / 1024
    if cfg.cache_features:
        parts = list(features_root.rglob("part-*.h5"))
        if len(parts) != 1:
            raise RuntimeError(f"train() rebuilt the feature cache ({len(parts)} part files): timing is invalid")
    records = [json.loads(line) for line in (cfg.output_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train" and r["step"] > 1]  # step 1: warm-up
    step_s = statistics.median(cfg.batch_size / r["volumes_per_s"] for r in steps)  # robust to a busy machine
    out.update(volumes_per_s=cfg.batch_size / step_s, step_s=step_s,
               measured_steps=len(steps), log_max_memory_mb=max(r["max_memory_mb"] for r in records),
               image_size=cfg.model.image_size, slice_chunk=cfg.model.slice_chunk, batch_size=cfg.batch_size,
               steps_per_epoch=len(CTReportDataset(cfg.ct_filepath, cfg.txt_filepath)) // cfg.batch_size)
    out["epoch_s"] = out["step_s"] * out["steps_per_epoch"]
    return out


def cpu_part(tmp: Path, store: Path, reports: Path, steps: dict[int | None, int], threads: int) -> list[dict]:
    """Each variant in a fresh process forked from a forkserver that imported ctclip once (importing
    ctclip.run.train takes ~14 s here, more than most variants' training)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ctclip.run.train", "ctclip.feature_cache", "ctclip.data.dataset"])
    rows = []
    for i, (label, size, freeze, cache, chunk, ckpt) in enumerate(CPU_VARIANTS):
        spec = dict(label=label, image_size=size, freeze=freeze, cache=cache, chunk=chunk, ckpt=ckpt,
                    steps=steps[size], threads=threads, store=str(store), reports=str(reports),
                    out=str(tmp / f"run{i}"))
        with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
            r = pool.submit(run_cpu_variant, spec).result()
        rows.append({"variant": label, **r})
        print(f"  {label} @ {r['image_size']} px: {r['volumes_per_s']:.1f} vol/s", flush=True)
    return rows


def cpu_summary(rows: list[dict]) -> dict:
    """Cache speedup per image size: epoch time recomputing / epoch time reading the cache."""
    out = {}
    for size in sorted({r["image_size"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["image_size"] == size}
        a, b = by["frozen, no cache"], by["frozen, cache"]
        out[size] = {"cache_epoch_speedup": a["epoch_s"] / b["epoch_s"],
                     "cache_build_s": b["cache_build_s"],
                     "cache_build_in_epochs_saved": b["cache_build_s"] / (a["epoch_s"] - b["epoch_s"])}
    return out


def print_cpu_table(rows: list[dict], summary: dict) -> None:
    print(f"\n{'variant':24s} {'px':>4s} {'chunk':>5s} {'vol/s':>8s} {'step s':>8s} {'epoch s':>8s}"
          f" {'cache build s':>13s} {'peak RSS +MB':>12s}")
    for r in rows:
        build = f"{r['cache_build_s']:13.2f}" if "cache_build_s" in r else f"{'-':>13s}"
        print(f"{r['variant']:24s} {r['image_size']:4d} {r['slice_chunk']:5d} {r['volumes_per_s']:8.1f}"
              f" {r['step_s']:8.3f} {r['epoch_s']:8.3f} {build} {r['peak_rss_growth_mb']:12.0f}")
    for size, s in summary.items():
        verdict = "met" if s["cache_epoch_speedup"] >= 20 else "NOT met"
        print(f"feature cache @ {size} px: frozen-backbone epoch {s['cache_epoch_speedup']:.1f}x faster than "
              f"recomputing (target >= 20x: {verdict}); the one-off build ({s['cache_build_s']:.2f} s) pays for "
              f"itself after {s['cache_build_in_epochs_saved']:.1f} epochs")


# ------------------------------------------------------------------------------------------ GPU part


def peak_tflops(flag: float | None) -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    if flag is not None:
        return flag, f"--peak_tflops {flag}"
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"table entry {key!r} for {name!r}"
    raise SystemExit(f"unknown GPU {name!r}: give its bf16 dense peak with --peak_tflops")


def _gpu_setup(encoder: str, freeze: bool, batch: int):
    import warnings

    from ctclip.losses import ClipLoss
    from ctclip.models.clip3d import param_groups
    from ctclip.models.factory import create_model
    from ctclip.run.train import TrainingStep

    warnings.filterwarnings("ignore", message=".*RANDOMLY initialised.*")
    model = create_model(encoder, freeze_dinov2=freeze, image_size=GPU_SHAPE[1]).cuda()
    step_module = TrainingStep(model, from_slices=False)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    volumes = torch.randint(0, 256, (batch, 1, *GPU_SHAPE), dtype=torch.uint8, device="cuda")
    tokens = model.tokenize([f"report {i}: bilateral pleural effusion." for i in range(batch)]).cuda()
    loss_fn = ClipLoss()

    def fwd_bwd() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v, t, scale = step_module(volumes, tokens)
            loss = loss_fn(v.float(), t.float(), scale.float())
        loss.backward()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()

    return model, fwd_bwd, step


def _gpu_try(encoder: str, freeze: bool, batch: int, steps: int) -> dict | None:
    """Numbers for one batch size, or None when it does not fit."""
    import gc

    from torch.utils.flop_counter import FlopCounterMode

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = fwd_bwd = step = None
    try:
        model, fwd_bwd, step = _gpu_setup(encoder, freeze, batch)
        for _ in range(2):  # warm-up (kernel selection, allocator)
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t) / steps
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        counter = FlopCounterMode(display=False)
        with counter:
            fwd_bwd()
        flops = counter.get_total_flops()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, fwd_bwd, step
        gc.collect()
        torch.cuda.empty_cache()
    return {"batch": batch, "step_s": seconds, "volumes_per_s": batch / seconds, "peak_mem_mb": peak_mb,
            "flops_per_step": flops}


def gpu_part(args: argparse.Namespace) -> dict:
    peak, source = peak_tflops(args.peak_tflops)
    out: dict = {"device": torch.cuda.get_device_name(), "peak_tflops": peak, "peak_source": source, "rows": []}
    for encoder in ("dinov2_vits14", "dinov2_vitb14"):
        for freeze in (True, False):
            best, batch = None, 1
            while batch <= args.gpu_max_batch:
                r = _gpu_try(encoder, freeze, batch, args.gpu_steps)
                if r is None:
                    break
                best, batch = r, batch * 2
            if best is None:
                out["rows"].append({"encoder": encoder, "frozen": freeze, "batch": 0, "note": "batch 1 does not fit"})
                continue
            best["mfu"] = best["flops_per_step"] / best["step_s"] / (peak * 1e12)
            out["rows"].append({"encoder": encoder, "frozen": freeze, **best})
            print(f"  {encoder} {'frozen' if freeze else 'unfrozen'}: batch {best['batch']}, "
                  f"{best['volumes_per_s']:.2f} vol/s, MFU {best['mfu']:.1%}", flush=True)
    return out


def print_gpu_table(gpu: dict) -> None:
    print(f"\nGPU {gpu['device']}, peak {gpu['peak_tflops']:.0f} TFLOP/s bf16 ({gpu['peak_source']}), "
          f"{GPU_SHAPE[0]}x{GPU_SHAPE[1]}x{GPU_SHAPE[2]}, bf16 autocast")
    print(f"{'encoder':15s} {'backbone':9s} {'batch':>5s} {'vol/s':>8s} {'peak GiB':>9s} {'TFLOP/step':>10s}"
          f" {'MFU':>6s}")
    for r in gpu["rows"]:
        if not r["batch"]:
            print(f"{r['encoder']:15s} {'frozen' if r['frozen'] else 'unfrozen':9s} {r['note']}")
            continue
        print(f"{r['encoder']:15s} {'frozen' if r['frozen'] else 'unfrozen':9s} {r['batch']:5d}"
              f" {r['volumes_per_s']:8.2f} {r['peak_mem_mb'] / 1024:9.1f} {r['flops_per_step'] / 1e12:10.2f}"
              f" {r['mfu']:6.1%}")
    vitb = [r for r in gpu["rows"] if r["encoder"] == "dinov2_vitb14" and not r["frozen"] and r["batch"]]
    if vitb:
        print(f"unfrozen ViT-B MFU {vitb[0]['mfu']:.1%} (target >= 35%: {'met' if vitb[0]['mfu'] >= 0.35 else 'NOT met'})")


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12,
                   help="optimizer steps per CPU variant of the tiny config (the first is warm-up)")
    p.add_argument("--steps_224", type=int, default=5, help="the same for the 224 px variants")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU training process")
    p.add_argument("--n_patients", type=int, default=12, help="synthetic patients (about 19 train volumes for 12)")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="run the CPU part")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto",
                   help="GPU part: auto = when CUDA is available; on = required")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the GPU's bf16 dense peak (default: from the device name: H100/H200 989, A100 312)")
    p.add_argument("--gpu_steps", type=int, default=10, help="timed steps per GPU configuration")
    p.add_argument("--gpu_max_batch", type=int, default=64, help="largest batch tried on the GPU")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    t0 = time.perf_counter()
    results: dict = {"threads": args.threads, "volume_shape": VOLUME_SHAPE}
    if args.cpu:
        with tempfile.TemporaryDirectory() as tmp_str:
            tmp = Path(tmp_str)
            store, reports = make_data(tmp, args.n_patients)
            print(f"CPU: tiny model (configs/ctclip/train_tiny.yaml: batch 8, fp32), {args.steps} (224 px:"
                  f" {args.steps_224}) steps per variant (first left out, median step time),"
                  f" {args.threads} torch thread(s), fresh process per variant", flush=True)
            rows = cpu_part(tmp, store, reports, {None: args.steps, 224: args.steps_224}, args.threads)
        summary = cpu_summary(rows)
        results["cpu"] = {"rows": rows, "summary": summary}
        print_cpu_table(rows, summary)
    cuda = torch.cuda.is_available()
    if args.gpu == "on" and not cuda:
        print("GPU part: --gpu on, but CUDA is not available", file=sys.stderr)
        return 2
    if args.gpu == "off" or not cuda:
        why = "--gpu off" if args.gpu == "off" else "CUDA is not available on this machine"
        print(f"\nGPU part skipped: {why}; the ViT-S/ViT-B volumes/s, peak GPU memory and MFU target "
              "(>= 35% for unfrozen ViT-B) are not measured in this run")
        results["gpu"] = {"skipped": why}
    else:
        results["gpu"] = gpu_part(args)
        print_gpu_table(results["gpu"])
    results["seconds"] = time.perf_counter() - t0
    print(f"\nbenchmark wall time {results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

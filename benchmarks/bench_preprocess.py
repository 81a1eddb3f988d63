"""Benchmark: NIfTI -> uint8 preprocessing and store loading, ours vs the floor and a reference.

    python benchmarks/bench_preprocess.py            # about 2-3 minutes on 2 cores

Per volume, on the real chest CT (512x512x133) and on a larger synthetic one built from it
(512x512x300), all in one run and on one thread:
  floor      nibabel reads and decompresses the stored array (dtype as stored, unscaled)
  reference  the seed's run_preprocess.py recipe, restated: nibabel closest canonical -> get_fdata
             (float64) -> clip -> float32 -> one trilinear resize -> pad -> uint8 (its defaults); the
             run also checks that ours gives the same bytes
  ours       ctclip.data.nifti.read_nifti + ctclip.data.preprocess.preprocess_volume
  our read   read_nifti alone (libdeflate inflate + header): what our processing adds on top of it
Then throughput of the whole job (scripts/ctclip_preprocess.py's run_preprocess) with 1 and 2
workers, peak RSS per variant (fresh process each), and volumes/s through CTReportDataset + DataLoader
vs a plain h5py read of the same volumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ctclip.data.nifti import read_nifti
from ctclip.data.preprocess import VolumeParams, preprocess_volume
from ctcore.cli import parse_args
from ctcore.samples import fetch_samples

TARGET = (160, 224, 224)


def floor(path: Path) -> np.ndarray:
    return nib.load(path).dataobj.get_unscaled()


def reference(path: Path) -> np.ndarray:
    canon = nib.as_closest_canonical(nib.load(path))
    vol = np.clip(canon.get_fdata(), -1000, 1000).transpose(2, 1, 0).astype(np.float32)
    scale = min(t / s for t, s in zip(TARGET, vol.shape))
    size = [int(round(s * scale)) for s in vol.shape]
    x = F.interpolate(torch.tensor(vol)[None, None], size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    x = np.pad(x, [((t - n) // 2, t - n - (t - n) // 2) for t, n in zip(TARGET, size)], constant_values=-1000)
    return np.clip((x / 1000.0 + 1.0) / 2.0 * 255.0, 0, 255)[:, ::-1, :].astype(np.uint8)


def ours(path: Path) -> np.ndarray:
    return preprocess_volume(read_nifti(path), None, VolumeParams(TARGET))[0]


def our_read(path: Path) -> np.ndarray:
    return read_nifti(path).raw


VARIANTS = {"floor": floor, "reference": reference, "ours": ours, "our_read": our_read}


def make_large(chest_ct: Path, out: Path, slices: int = 300) -> Path:
    """512x512x300 from the real chest CT: resampled along z, with scanner-like noise, stored as CT-RATE
    does today (int16 HU, no header scaling)."""
    img = nib.load(chest_ct)
    hu = torch.from_numpy(np.asanyarray(img.dataobj).astype(np.float32))
    big = F.interpolate(hu[None, None], size=(512, 512, slices), mode="trilinear", align_corners=False)[0, 0]
    big += torch.randn(big.shape, generator=torch.Generator().manual_seed(0)) * 12
    affine = img.affine.copy()
    affine[:3, 2] *= 133 / slices
    nib.save(nib.Nifti1Image(big.round().numpy().astype(np.int16), affine), out)
    return out


def time_variant(fn, path: Path, repeats: int) -> float:
    fn(path)  # warm the page cache and lazy imports
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_mb(variant: str, path: Path) -> float:
    """Peak RSS above the post-import baseline, in MB, from a fresh process."""
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from benchmarks.bench_preprocess import VARIANTS, _rss_kb\n"
        "from pathlib import Path\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "base = _rss_kb('VmRSS')\n"
        f"VARIANTS[{variant!r}](Path({str(path)!r}))\n"
        "print((_rss_kb('VmHWM') - base) / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def throughput(folder: Path, workers: int, out: Path) -> tuple[float, float]:
    """(volumes/s over the whole job, volumes/s after the first volume, i.e. without pool start-up)."""
    from ctclip.run.preprocess import PreprocessConfig, run_preprocess

    cfg = PreprocessConfig(ct_data_path=folder, ct_out_path=out, target_shape=TARGET, num_workers=workers,
                           overwrite=True)
    summary = run_preprocess(cfg)
    assert not summary.failed, summary.failed
    return summary.done / summary.seconds, (summary.done - 1) / (summary.seconds - summary.first_seconds)


class PlainH5Dataset(torch.utils.data.Dataset):
    """The straightforward reference: open the file in the worker, `f[name][()]`, default collate."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names, self.f = path, names, None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        import h5py

        if self.f is None:
            self.f = h5py.File(self.path, "r")
        return torch.from_numpy(self.f[self.names[i]][()])[None], "x"


def loader_rates(store: Path, tmp: Path, workers: int) -> dict[str, float]:
    """Volumes/s: a plain h5py loop (floor), our dataset in the main process, and, through DataLoader
    workers, the plain h5py dataset with default collate vs our dataset with its zero-copy batches."""
    import h5py
    from torch.utils.data import DataLoader

    from ctclip.data.dataset import CTReportDataset, make_loader

    with h5py.File(store, "r") as f:
        names = sorted(f)
    reports = tmp / "reports.csv"
    pd.DataFrame({"VolumeName": names, "ClinicalInformation_EN": "", "Technique_EN": "", "Findings_EN": "x",
                  "Impressions_EN": ""}).to_csv(reports, index=False)

    def plain_loop() -> float:
        t = time.perf_counter()
        with h5py.File(store, "r") as f:
            for n in names:
                f[n][()]
        return len(names) / (time.perf_counter() - t)

    def rate(loader) -> float:
        t = time.perf_counter()
        n = sum(v.shape[0] for v, _ in loader)
        return n / (time.perf_counter() - t)

    ours = CTReportDataset(store, reports, "findings")
    loaders = {
        "ours_in_process": make_loader(ours, batch_size=1, num_workers=0),
        "plain_workers": DataLoader(PlainH5Dataset(store, names), batch_size=1, num_workers=workers,
                                    persistent_workers=True),
        "ours_workers": make_loader(ours, batch_size=1, num_workers=workers),
    }
    out = {"plain_loop": statistics.median([plain_loop() for _ in range(6)][1:])}
    for key, loader in loaders.items():
        out[key] = statistics.median([rate(loader) for _ in range(6)][1:])  # first pass warms workers
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--copies", type=int, default=16, help="volumes in the throughput and loader runs")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    torch.set_num_threads(1)
    samples = fetch_samples(keys=["chest_ct"])
    results: dict = {"volumes": {}}
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        large = make_large(samples.chest_ct, tmp / "large_512x512x300.nii.gz")
        print(f"{'volume':26s} {'floor s':>8s} {'ref s':>8s} {'ours s':>8s} {'our read':>9s} {'ours/floor':>10s}"
              f" {'ref/ours':>9s} {'RSS MB floor/ref/ours':>22s} {'ours RSS/raw':>12s}")
        for label, path in (("real chest 512x512x133", samples.chest_ct), ("synthetic 512x512x300", large)):
            t = {k: time_variant(fn, path, args.repeats) for k, fn in VARIANTS.items()}
            rss = {k: peak_rss_mb(k, path) for k in ("floor", "reference", "ours")}
            raw_mb = read_nifti(path).raw.nbytes / 2**20
            same = bool(np.array_equal(ours(path), reference(path)))
            results["volumes"][label] = {"seconds": t, "peak_rss_mb": rss, "raw_mb": raw_mb, "same_bytes": same}
            print(f"{label:26s} {t['floor']:8.3f} {t['reference']:8.3f} {t['ours']:8.3f} {t['our_read']:9.3f}"
                  f" {t['ours'] / t['floor']:10.2f}"
                  f" {t['reference'] / t['ours']:9.2f} {rss['floor']:6.0f}/{rss['reference']:6.0f}/{rss['ours']:6.0f}"
                  f"    {rss['ours'] / raw_mb:10.2f}   same bytes as the seed's: {'yes' if same else 'NO'}")
        folder = tmp / "copies"
        folder.mkdir()
        for i in range(args.copies):
            (folder / f"train_{i}_a_1.nii.gz").symlink_to(samples.chest_ct)
        rates = {w: throughput(folder, w, tmp / f"w{w}.h5") for w in (1, 2)}
        results["throughput_vol_per_s"] = {w: {"job": a, "steady": b} for w, (a, b) in rates.items()}
        for w, (a, b) in rates.items():
            print(f"job throughput, {w} worker(s), {args.copies} real volumes -> {TARGET}: {a:.2f} vol/s overall, "
                  f"{b:.2f} vol/s after the first volume (pool start-up excluded)")
        r = loader_rates(tmp / "w2.h5", tmp, workers=2)
        results["loader_vol_per_s"] = r
        print(f"loading {TARGET} uint8 volumes (vol/s): plain h5py loop {r['plain_loop']:.0f}; "
              f"CTReportDataset in process {r['ours_in_process']:.0f} (x{r['ours_in_process'] / r['plain_loop']:.2f}); "
              f"2 DataLoader workers: plain h5py dataset {r['plain_workers']:.0f}, CTReportDataset "
              f"{r['ours_workers']:.0f} (x{r['ours_workers'] / r['plain_workers']:.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

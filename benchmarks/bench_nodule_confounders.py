"""What a lung-nodule detector is up against on the synthetic chest set: the small, solid, isolated blobs in
the lungs of every volume, and which planted findings made them.

    python benchmarks/bench_nodule_confounders.py --data_dir DIR/ct_rate            # a set the learning
                                                                                    # benchmark built
    python benchmarks/bench_nodule_confounders.py --data_dir DIR/ct_rate --limit 0 --json blobs.json

A blob is a connected component (face connectivity) of 3 to 80 voxels above --solid_hu (-50 HU: soft tissue,
not the partial volume of aerated lung), at least --aerated of whose in-plane neighbours (the 3 x 3 ring
around it in its slices) are aerated lung (< -500 HU): what a solid nodule of 20-32 mm (~8-60 voxels) is
at the learning set's 5.6 x 5.6 x 9.4 mm voxels. Per volume the script counts the blobs. The count's AUROC
for the "Lung nodule" label is what the simplest detector of such blobs (no shape beyond size, no place)
reaches; the finding masks (`masks/`, bits in synthetic_info.json) then say which planted finding each blob
belongs to: a nodule, another finding (airway walls, fibrotic bands, ...), or the base anatomy. Everything is
read from the NIfTI volumes and masks the generator wrote (HU = stored + RescaleIntercept), not from the
model's store.
A volume or mask that cannot be read (or whose shapes differ) is skipped and named in the output. Prints a
markdown table; --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NODULE = "Lung nodule"
ANATOMY = "(no planted finding)"
AERATED_HU = -500.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, required=True, help="a synthetic set (ctclip_make_synthetic.py --out_dir)")
    p.add_argument("--side", choices=("train", "valid"), default="train")
    p.add_argument("--limit", type=int, default=400, help="the first N volumes by name (0: all)")
    p.add_argument("--solid_hu", type=float, default=-50.0)
    p.add_argument("--aerated", type=float, default=0.8, help="share of the in-plane ring that must be aerated lung")
    p.add_argument("--min_voxels", type=int, default=3)
    p.add_argument("--max_voxels", type=int, default=80)
    p.add_argument("--json", type=Path)
    return p


def find_blobs(hu: np.ndarray, solid_hu: float = -50.0, aerated: float = 0.8, min_voxels: int = 3,
               max_voxels: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) HU -> (labels of the blobs (0 elsewhere), their label ids): components of `min_voxels` to
    `max_voxels` voxels above `solid_hu` whose in-plane 3 x 3 ring is at least `aerated` aerated lung."""
    solid = hu > solid_hu
    lab, n = ndi.label(solid)
    if n == 0:
        return np.zeros_like(lab), np.zeros(0, dtype=np.int64)
    ids = np.arange(1, n + 1)
    size = ndi.sum_labels(solid, lab, ids)
    small = ids[(size >= min_voxels) & (size <= max_voxels)]
    lab = np.where(np.isin(lab, small), lab, 0)
    # the ring: the in-plane neighbours of a small component that are not part of it (a voxel beside two
    # components counts for the one with the larger id; isolated blobs rarely have such neighbours)
    near = ndi.grey_dilation(lab, footprint=np.ones((3, 3, 1), dtype=bool))
    ring = (near > 0) & (lab != near)
    share = ndi.mean(hu[ring] < AERATED_HU, near[ring], small) if small.size else np.zeros(0)
    keep = small[np.nan_to_num(np.asarray(share, dtype=float), nan=0.0) >= aerated]
    return np.where(np.isin(lab, keep), lab, 0), keep


def owners(lab: np.ndarray, ids: np.ndarray, mask: np.ndarray, bits: dict[str, int]) -> list[str]:
    """The finding each blob belongs to: the nodule if any of its voxels carries the nodule bit, else the
    finding whose bit most of its voxels carry, else the base anatomy."""
    out = []
    for i in ids:  # a few blobs per volume
        m = mask[lab == i].astype(np.int64)
        if np.any(m & bits[NODULE]):
            out.append(NODULE)
            continue
        hits = {name: int(np.count_nonzero(m & b)) for name, b in bits.items()}
        best = max(hits, key=hits.get)
        out.append(best if hits[best] else ANATOMY)
    return out


def scan(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    info = json.loads((args.data_dir / "synthetic_info.json").read_text())
    bits, volumes = info["mask_bits"], {v["VolumeName"]: v for v in info["volumes"]}
    paths = sorted((args.data_dir / "volumes" / args.side).rglob("*.nii.gz"))
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise FileNotFoundError(f"{args.data_dir / 'volumes' / args.side}: no .nii.gz volume")
    counts, labels, blob_owner, blob_hu = [], [], Counter(), {NODULE: [], "other": []}
    skipped: list[dict[str, str]] = []
    for path in paths:
        meta = volumes.get(path.name)
        try:
            if meta is None:
                raise ValueError("not in synthetic_info.json")
            hu = np.asarray(nib.load(path).dataobj, dtype=np.float32) + float(meta["RescaleIntercept"])
            mask = np.asarray(nib.load(args.data_dir / "masks" / path.name).dataobj)
            if mask.shape != hu.shape:
                raise ValueError(f"mask shape {mask.shape} is not the volume's {hu.shape}")
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as e:
            skipped.append({"file": str(path), "error": f"{type(e).__name__}: {e}"})  # reported, the rest goes on
            continue
        lab, ids = find_blobs(hu, args.solid_hu, args.aerated, args.min_voxels, args.max_voxels)
        who = owners(lab, ids, mask, bits)
        for i, w in zip(ids, who, strict=True):
            blob_owner[w] += 1
            blob_hu[NODULE if w == NODULE else "other"].append(float(hu[lab == i].mean()))
        counts.append(len(ids))
        labels.append(NODULE in meta["planted"])
    counts_a, labels_a = np.array(counts), np.array(labels)
    if labels_a.all() or not labels_a.any():
        raise ValueError(f"{len(counts)} readable volumes ({len(skipped)} skipped): the nodule label has one value "
                         "only; use more (--limit)")
    q = lambda a: [round(float(x), 1) for x in np.quantile(a, [0.1, 0.5, 0.9])] if len(a) else []  # noqa: E731
    return {
        "benchmark": "ctclip_nodule_confounders", "data_dir": str(args.data_dir), "side": args.side,
        "volumes": len(counts), "with_nodules": int(labels_a.sum()), "skipped": skipped,
        "settings": {k: getattr(args, k) for k in ("solid_hu", "aerated", "min_voxels", "max_voxels")},
        "count_auroc": float(roc_auc_score(labels_a, counts_a)),
        "count_quantiles": {"with": q(counts_a[labels_a]), "without": q(counts_a[~labels_a])},
        "blob_owners": dict(blob_owner.most_common()),
        "blob_hu_quantiles": {k: q(v) for k, v in blob_hu.items()},
    }


def report(r: dict[str, Any]) -> str:
    total = sum(r["blob_owners"].values())
    lines = [f"{r['volumes']} {r['side']} volumes ({r['with_nodules']} with nodules); blob count's AUROC for "
             f"nodules: **{r['count_auroc']:.3f}**",
             f"blobs per volume (10/50/90 %): with nodules {r['count_quantiles']['with']}, without "
             f"{r['count_quantiles']['without']}",
             f"mean HU of the blobs (10/50/90 %): nodules {r['blob_hu_quantiles'][NODULE]}, others "
             f"{r['blob_hu_quantiles']['other']}", "", "| blobs made by | count | share |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {v / max(total, 1):.0%} |" for k, v in r["blob_owners"].items()]
    if r["skipped"]:
        lines += ["", f"skipped {len(r['skipped'])} unreadable volume(s):"]
        lines += [f"- {x['file']}: {x['error']}" for x in r["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = scan(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:  # the JSON first: the table is what stays on screen
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Synthetic head CT studies in the RSNA 2019 format, with planted hemorrhages of the five subtypes.

    python scripts/hemorrhage_make_synthetic.py --out_dir data/synth_head --n_studies 20 --size 512 \\
        --slices 32 --seed 0 --broken 2 --montage data/synth_head/montage.png

Each study is the real CT brain atlas in a synthetic skull and scalp (`synthetic_anatomy`), posed a
little differently in the scanner (`synthetic_scanner`), with none, one or several acute bleeds, sampled
as axial slices (a thick series, sometimes also a thin one; `synthetic_study`) and written as DICOM files
(`synthetic_dicom`, with the storage styles of `synthetic_style` and the UIDs of `synthetic_header`).
This module writes the whole dataset:

    DIR/dicom/...                  one file per slice, shuffled names, several folder layouts
    DIR/labels.csv                 Kaggle stage_2_train.csv format: ID,Label; ID = <SOPInstanceUID>_<class>
    DIR/studies.csv                one row per axial series: uids, n_slices, 0/1 per class
    DIR/broken.csv                 path,kind of the deliberately broken files (not in labels.csv)
    DIR/truth/<SeriesUID>.npz      per-slice masks (bit per subtype), labels, SOP UIDs and paths in true
                                   position order; see `read_truth`
    DIR/truth/files.csv, bleeds.csv  every file written; every bleed planted
    DIR/config.yaml                the resolved configuration

`synthetic_study.synthesize_study(cfg, index)` returns one study in memory (HU volumes, masks, geometry)
exactly as `generate_head_dataset` writes it: same config and seed, same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctcore.atomic import atomic_write
from hemorrhage.classes import CLASSES, KAGGLE_ROW_ORDER, SUBTYPES
from hemorrhage.synthetic.anatomy import load_head_anatomy
from hemorrhage.synthetic.config import HeadSynthConfig, validate_config
from hemorrhage.synthetic.dicom import FileRecord, write_atomic, write_study_files
from hemorrhage.synthetic.series import SUBTYPE_BIT, SyntheticSeries, SyntheticStudy
from hemorrhage.synthetic.study import synthesize_study

OUTPUTS = ("dicom", "truth", "labels.csv", "studies.csv", "broken.csv", "config.yaml")


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out_dir {out_dir} is not empty; pass --overwrite to replace a synthetic dataset")
        for name in OUTPUTS:  # only what this generator writes: other files are left alone
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


@dataclass
class HeadDatasetSummary:
    out_dir: Path
    n_studies: int
    n_series: int
    n_slices: int  # labelled slices (broken files and localizers excluded)
    n_files: int
    n_broken: int
    n_localizers: int
    positive_slices: dict[str, int]
    positive_series: dict[str, int]
    seconds: float

    def line(self) -> str:
        pos = ", ".join(f"{c} {self.positive_slices[c]}/{self.positive_series[c]}" for c in CLASSES)
        return (f"synthetic head CT: {self.n_studies} studies, {self.n_series} series, {self.n_slices} labelled "
                f"slices; positive slices/series: {pos}; {self.n_broken} broken files, {self.n_localizers} "
                f"localizers; {self.seconds:.1f} s -> {self.out_dir}")


def plan_broken(cfg: HeadSynthConfig) -> dict[int, list[str]]:
    """Which studies get how many broken files, of which kind (alternating), spread evenly."""
    plan: dict[int, list[str]] = {}
    if cfg.broken == 0:
        return plan
    order = np.random.default_rng([cfg.seed, 0xB40CE4]).permutation(cfg.n_studies)
    for k in range(cfg.broken):
        plan.setdefault(int(order[k % cfg.n_studies]), []).append("truncated" if k % 2 == 0 else "no_pixel_data")
    return plan


def _csv_bytes(header: list[str], rows: list[list[object]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps, so equal arrays give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    atomic_write(path, write)


def truth_arrays(study: SyntheticStudy, s: SyntheticSeries, records: list[FileRecord]) -> dict[str, np.ndarray]:
    g, st = s.meta.geometry, s.meta.style
    return {
        "masks": s.masks, "labels": s.labels, "classes": np.array(CLASSES),
        "subtypes": np.array(SUBTYPES), "subtype_bits": np.array([SUBTYPE_BIT[x] for x in SUBTYPES], np.uint8),
        "sop_uids": np.array(s.meta.sop_uids), "paths": np.array([r.path for r in records]),
        "broken": np.array([r.broken for r in records]), "positions": g.positions,
        "position_along_normal": g.positions @ g.normal, "orientation": np.array(g.orientation),
        "instance_numbers": np.array(s.meta.instance_numbers, np.int32),
        "study_index": np.array(study.index), "findings": np.array(study.findings, dtype="<U32"),
        "study_uid": np.array(study.header.study_uid), "series_uid": np.array(s.meta.series_uid),
        "kind": np.array(s.kind), "pixel_format": np.array(st.pixel_format),
        "transfer_syntax": np.array(st.transfer_syntax), "quirk": np.array(st.quirk),
        "pixel_spacing": np.array(g.pixel_spacing), "thickness": np.array(g.thickness),
        "bleeds": np.array(json.dumps(study.bleeds, sort_keys=True)),
    }


def read_truth(path: str | Path) -> dict[str, object]:
    """A truth file as a dict (scalars unpacked; ``bleeds`` parsed from JSON)."""
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, object] = {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    out["bleeds"] = json.loads(str(out["bleeds"]))
    return out


def generate_head_dataset(cfg: HeadSynthConfig) -> HeadDatasetSummary:
    """Write the dataset `cfg` describes (see the module docstring for the files)."""
    from tqdm.auto import tqdm

    from ctcore.cli import save_resolved

    t0 = time.perf_counter()
    validate_config(cfg)
    out = Path(cfg.out_dir)
    prepare_out_dir(out, cfg.overwrite)
    anat = load_head_anatomy()
    plan = plan_broken(cfg)
    used: set[str] = set()
    labels, series_rows, file_rows, bleed_rows = [], [], [], []
    pos_slices = dict.fromkeys(CLASSES, 0)
    pos_series = dict.fromkeys(CLASSES, 0)
    n_files = n_broken = n_loc = 0
    for i in tqdm(range(cfg.n_studies), desc="synthetic head studies", unit="study", disable=None):
        study = synthesize_study(cfg, i, anat)
        records = write_study_files(study, out, cfg.seed, plan.get(i, []), used)
        axial = {r.sop_uid: r for r in records if r.kind == "axial"}
        for s in study.series:
            recs = [axial[u] for u in s.meta.sop_uids]
            save_npz(out / "truth" / f"{s.meta.series_uid}.npz", truth_arrays(study, s, recs))
            ok = np.array([r.broken == "" for r in recs])
            for k in np.flatnonzero(ok):
                row = dict(zip(CLASSES, s.labels[k].tolist(), strict=True))
                labels += [[f"{recs[k].sop_uid}_{c}", row[c]] for c in KAGGLE_ROW_ORDER]
            flags = s.labels[ok].max(axis=0) if ok.any() else np.zeros(len(CLASSES), np.uint8)
            series_rows.append([study.header.study_uid, s.meta.series_uid, int(ok.sum()), *flags.tolist()])
            for c, n_pos, f in zip(CLASSES, s.labels[ok].sum(axis=0), flags, strict=True):
                pos_slices[c] += int(n_pos)
                pos_series[c] += int(f)
        for b in study.bleeds:
            rest = {k: v for k, v in b.items() if k not in ("subtype", "pattern", "density_hu", "volume_ml")}
            bleed_rows.append([study.header.study_uid, b["subtype"], b["pattern"], b["density_hu"], b["volume_ml"],
                               json.dumps(rest, sort_keys=True)])
        for r in records:
            file_rows.append([r.path, r.kind, r.broken, r.study_uid, r.series_uid, r.sop_uid, r.slice_index])
        n_files += len(records)
        n_broken += sum(r.broken != "" for r in records)
        n_loc += sum(r.kind == "localizer" for r in records)
    write_atomic(out / "labels.csv", _csv_bytes(["ID", "Label"], labels))
    write_atomic(out / "studies.csv", _csv_bytes(["StudyInstanceUID", "SeriesInstanceUID", "n_slices", *CLASSES],
                                                 series_rows))
    write_atomic(out / "broken.csv", _csv_bytes(["path", "kind"], [[r[0], r[2]] for r in file_rows if r[2]]))
    write_atomic(out / "truth" / "files.csv", _csv_bytes(
        ["path", "kind", "broken", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "slice_index"], file_rows))
    write_atomic(out / "truth" / "bleeds.csv", _csv_bytes(
        ["StudyInstanceUID", "subtype", "pattern", "density_hu", "volume_ml", "details"], bleed_rows))
    save_resolved(cfg, out / "config.yaml")
    return HeadDatasetSummary(out, cfg.n_studies, len(series_rows), len(labels) // len(CLASSES), n_files, n_broken,
                              n_loc, pos_slices, pos_series, time.perf_counter() - t0)

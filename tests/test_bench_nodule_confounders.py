"""benchmarks/bench_nodule_confounders.py: which small solid blobs in the lung it counts, whom it gives them to,
and its AUROC on a hand-built set with one volume of each kind."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmarks.bench_nodule_confounders import ANATOMY, NODULE, find_blobs, main, owners

BITS = {NODULE: 512, "Peribronchial thickening": 16384}


def chest(nodule: bool) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) HU of aerated lung (-850) inside a chest wall (40 HU), and its finding mask."""
    hu = np.full((24, 24, 6), 40.0, dtype=np.float32)
    hu[3:21, 3:21, :] = -850.0
    mask = np.zeros(hu.shape, dtype=np.int32)
    wall = np.zeros(hu.shape, dtype=bool)  # an airway wall cut across: a solid 2 x 2 x 1 piece, peribronchial
    wall[14:16, 6:8, 2] = True
    hu[wall] = 20.0
    mask[wall] |= BITS["Peribronchial thickening"]
    hu[3:5, 10:12, 3] = 45.0  # solid, but on the chest wall: its ring is not aerated lung
    hu[8, 16, 1] = 45.0  # a speck of 2 voxels: below the smallest size
    hu[8, 17, 1] = 45.0
    hu[16:19, 15:18, 4] = -200.0  # partial volume of a septum: not solid
    if nodule:
        hu[8:11, 8:11, 2:4] = 40.0  # 3 x 3 x 2 voxels: a nodule of ~17 mm at 5.6 x 5.6 x 9.4 mm
        mask[8:11, 8:11, 2:4] |= BITS[NODULE]
    return hu, mask


def test_find_blobs_counts_isolated_solid_components_of_the_right_size_and_names_their_findings():
    hu, mask = chest(nodule=True)
    lab, ids = find_blobs(hu)
    assert len(ids) == 2
    assert sorted(owners(lab, ids, mask, BITS)) == [NODULE, "Peribronchial thickening"]
    assert (lab > 0).sum() == 3 * 3 * 2 + 2 * 2
    # a blob the masks do not explain is the base anatomy's
    assert owners(lab, ids, np.zeros_like(mask), BITS) == [ANATOMY, ANATOMY]
    # stricter settings: the 4-voxel wall piece is too small, and at -250 HU the septum joins in
    assert len(find_blobs(hu, min_voxels=5)[1]) == 1
    assert len(find_blobs(hu, solid_hu=-250.0)[1]) == 3


def write_set(root, kinds: list[bool]) -> None:
    volumes = []
    for i, nodule in enumerate(kinds):
        name = f"train_{i}_a_1.nii.gz"
        hu, mask = chest(nodule)
        folder = root / "volumes" / "train" / f"train_{i}" / f"train_{i}_a"
        folder.mkdir(parents=True)
        (root / "masks").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image((hu + 1024).astype(np.int16), np.diag([5.6, 5.6, 9.4, 1.0])), folder / name)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "masks" / name)
        volumes.append({"VolumeName": name, "RescaleIntercept": -1024, "planted": {NODULE: {}} if nodule else {}})
    (root / "synthetic_info.json").write_text(json.dumps({"mask_bits": BITS, "volumes": volumes}))


def test_main_reports_the_count_auroc_and_the_owners(tmp_path, capsys):
    write_set(tmp_path, [True, False, True, False])
    assert main(["--data_dir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["volumes"] == 4 and r["with_nodules"] == 2
    assert r["count_auroc"] == 1.0  # two blobs with a nodule, one without
    assert r["blob_owners"] == {"Peribronchial thickening": 4, NODULE: 2}
    assert "AUROC for nodules: **1.000**" in capsys.readouterr().out


def test_unreadable_volumes_are_skipped_and_named(tmp_path, capsys):
    write_set(tmp_path, [True, False, True, False, True])
    broken = next((tmp_path / "volumes").rglob("train_4_a_1.nii.gz"))
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    (tmp_path / "masks" / "train_3_a_1.nii.gz").unlink()  # no mask
    assert main(["--data_dir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["volumes"] == 3 and r["count_auroc"] == 1.0
    assert sorted(Path(x["file"]).name for x in r["skipped"]) == ["train_3_a_1.nii.gz", "train_4_a_1.nii.gz"]
    out = capsys.readouterr().out
    assert "skipped 2 unreadable volume(s)" in out and "train_4_a_1.nii.gz" in out


def test_main_refuses_sets_it_cannot_score(tmp_path, capsys):
    assert main(["--data_dir", str(tmp_path / "none")]) == 2
    write_set(tmp_path, [False, False])
    assert main(["--data_dir", str(tmp_path)]) == 2
    assert "one value only" in capsys.readouterr().err

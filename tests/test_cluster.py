"""Cluster operation: sharded preprocessing + merge (ctclip/data/shards.py), the SLURM job scripts
(scripts/slurm/) and the Apptainer definition (apptainer/ct-toolkit.def).

The job scripts cannot be submitted here; they are checked as far as a machine without SLURM allows:
valid bash, every `scripts/X.py --flag` they (and their usage lines, and docs/cluster.md) run is
accepted by that script's own parser, and they run as plain bash with fake `sbatch` / `apptainer`
commands that record what they were asked to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ctclip.data.dataset import CTReportDataset
from ctclip.data.shards import check_shard, select_shard, shard_of, shard_path
from ctclip.data.store import StoreError, VolumeStore
from ctclip.data.store_writer import StoreSpec, StoreWriter
from scripts.ctclip_merge_stores import main as merge
from scripts.ctclip_preprocess import main as preprocess
from tests.script_calls import bad_flags, invocations, logical_lines

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
JOB_FILES = sorted([*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh")])
SHARDS = 3


def _preprocess_args(chest: Path, out: Path, *extra: str) -> list[str]:
    # the flags conftest's synthetic_chest used for train.h5 (the unsharded reference)
    return ["--ct_data_path", str(chest / "volumes" / "train"), "--ct_out_path", str(out),
            "--metadata_path", str(chest / "train_metadata.csv"), "--target_shape", "16", "48", "48",
            "--num_workers", "0", *extra]


@pytest.fixture(scope="module")
def shard_dir(synthetic_chest, tmp_path_factory) -> Path:
    """The synthetic train set preprocessed in 3 shards through the script: shards/train.shard-<i>-of-3.h5."""
    d = tmp_path_factory.mktemp("shards")
    for i in range(SHARDS):
        args = _preprocess_args(synthetic_chest, d / "train.h5", "--num_shards", str(SHARDS), "--shard_index", str(i))
        assert preprocess(args) == 0
    return d


def _shards(d: Path) -> list[Path]:
    return [shard_path(d / "train.h5", i, SHARDS) for i in range(SHARDS)]


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in _shards(src):
        shutil.copy2(p, dst / p.name)
    return dst


def _assert_same_store(reference: Path, other: Path, names: list[str] | None = None) -> None:
    with VolumeStore(reference) as a, VolumeStore(other) as b:
        expected = a.names() if names is None else names
        assert b.names() == expected
        for name in expected:
            np.testing.assert_array_equal(b.read(name), a.read(name))
            assert b.attrs(name) == a.attrs(name)
        fa, fb = a.file_attrs(), b.file_attrs()
        for key in ("config", "target_shape", "store_version", "ctclip_version"):
            assert fb[key] == fa[key], key


# ------------------------------------------------------------------------------------- shard choice

def test_shard_of_is_a_stable_hash_that_partitions_the_names():
    names = [f"train_{p}_{s}_{r}.nii.gz" for p in range(1, 700) for s in "ab" for r in (1, 2, 3)]
    for n in (1, 3, 16):
        shards = [select_shard(names, i, n) for i in range(n)]
        assert sorted(x for s in shards for x in s) == sorted(names)  # every volume in exactly one shard
        assert sum(len(s) for s in shards) == len(names)
    # independent oracle: sha256 of the name, first 8 bytes big-endian, modulo N (must never change, or
    # existing shard stores would hold volumes of other shards)
    for name in names[:50]:
        assert shard_of(name, 16) == int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % 16
    counts = Counter(shard_of(x, 16) for x in names)
    expected, sd = len(names) / 16, (len(names) / 16 * (1 - 1 / 16)) ** 0.5
    assert max(abs(c - expected) for c in counts.values()) < 4 * sd
    # a volume's shard does not depend on the other names: adding files moves nothing
    assert select_shard(names[:100], 5, 16) == [x for x in select_shard(names, 5, 16) if x in set(names[:100])]


def test_shard_flags_and_paths():
    assert check_shard(None, None) is None
    assert check_shard(2, 3) == (2, 3)
    for index, n, message in ((0, None, "go together"), (None, 4, "go together"), (4, 4, r"outside 0\.\.3"),
                              (-1, 4, "outside"), (0, 0, "at least 1")):
        with pytest.raises(ValueError, match=message):
            check_shard(index, n)
    assert shard_path(Path("d/train_volumes.h5"), 3, 16) == Path("d/train_volumes.shard-03-of-16.h5")
    assert shard_path(Path("d/x.errors.csv"), 0, 3) == Path("d/x.errors.shard-0-of-3.csv")
    assert shard_path("x.h5", 7, 100).name == "x.shard-007-of-100.h5"


def test_preprocess_shard_usage_errors(synthetic_chest, tmp_path, caplog):
    assert preprocess(_preprocess_args(synthetic_chest, tmp_path / "t.h5", "--shard_index", "0")) == 2
    assert preprocess(_preprocess_args(synthetic_chest, tmp_path / "t.h5", "--num_shards", "3",
                                       "--shard_index", "3")) == 2
    assert "--shard_index 3 is outside 0..2" in caplog.text and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ shards, end to end

def test_shards_cover_every_volume_once_and_resume(synthetic_chest, shard_dir, capsys):
    with VolumeStore(synthetic_chest / "train.h5") as ref:
        all_names = ref.names()
    seen: list[str] = []
    for i, path in enumerate(_shards(shard_dir)):
        with VolumeStore(path) as s:
            assert s.file_attrs()["shard_index"] == i and s.file_attrs()["num_shards"] == SHARDS
            assert all(shard_of(n, SHARDS) == i for n in s.names())
            seen += s.names()
        assert (path.parent / (path.name + ".errors.csv")).is_file()  # one errors CSV per shard
    assert sorted(seen) == all_names and len(seen) == len(set(seen))
    assert all(0 < sum(shard_of(n, SHARDS) == i for n in all_names) for i in range(SHARDS))  # none empty here
    # the same command again resumes: everything in the shard is skipped, the store is unchanged
    capsys.readouterr()
    args = _preprocess_args(synthetic_chest, shard_dir / "train.h5", "--num_shards", str(SHARDS), "--shard_index", "1")
    assert preprocess(args) == 0
    n1 = sum(shard_of(n, SHARDS) == 1 for n in all_names)
    assert f"0 done, {n1} skipped" in capsys.readouterr().out
    # a shard store refuses to be resumed as another shard (or as an unsharded store)
    with VolumeStore(_shards(shard_dir)[1]) as s:
        config = s.file_attrs()["config"]
    for shard, message in (((2, 3), "holds shard 1 of 3, asked for shard 2 of 3"),
                           (None, "holds shard 1 of 3, asked for an unsharded store")):
        with pytest.raises(StoreError, match=message):
            StoreWriter.open(_shards(shard_dir)[1], [], StoreSpec((16, 48, 48), config, "", shard))


@pytest.mark.parametrize("mode", ["copy", "virtual"])
def test_merge_equals_an_unsharded_run(synthetic_chest, shard_dir, tmp_path, mode, capsys):
    out = tmp_path / "merged" / "train.h5"
    args = ["--stores", str(shard_dir / "train.shard-*.h5"), "--out", str(out), "--mode", mode]
    assert merge(args) == 0
    _assert_same_store(synthetic_chest / "train.h5", out)
    with h5py.File(out, "r") as f, h5py.File(synthetic_chest / "train.h5", "r") as ref:
        name = next(n for n in ref if n != "_pending")
        assert f[name].is_virtual == (mode == "virtual")
        if mode == "copy":  # the layout of any store: chunked by slice, uncompressed
            assert (f[name].chunks, f[name].compression) == (ref[name].chunks, ref[name].compression)
        for key in ref[name].attrs:  # attribute types too (fixed-size strings), not only values
            assert f[name].attrs.get_id(key).dtype == ref[name].attrs.get_id(key).dtype, key
    # re-running gives the same store (copy: nothing is copied again)
    capsys.readouterr()
    assert merge(args) == 0
    line = capsys.readouterr().out
    if mode == "copy":
        with VolumeStore(out) as s:
            assert f"0 copied, {len(s)} already there" in line
    _assert_same_store(synthetic_chest / "train.h5", out)
    # the datasets read it like any store
    reports = synthetic_chest / "train_reports.csv"
    a, b = CTReportDataset(synthetic_chest / "train.h5", reports), CTReportDataset(out, reports)
    assert a.names == b.names and len(b) > 0
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_virtual_store_moves_with_its_shards_and_refuses_stale_ones(synthetic_chest, shard_dir, tmp_path, caplog):
    folder = _copy_shards(shard_dir, tmp_path / "a")
    assert merge(["--stores", str(folder / "train.shard-*.h5"), "--out", str(folder / "train.h5"),
                  "--mode", "virtual"]) == 0
    moved = tmp_path / "b" / "moved"
    shutil.move(str(folder), str(moved))  # relative source paths: the folder moves as a whole
    _assert_same_store(synthetic_chest / "train.h5", moved / "train.h5")
    # a missing shard is an error on open, not volumes of zeros
    gone = _shards(moved)[1]
    gone.rename(gone.with_suffix(".bak"))
    with pytest.raises(StoreError, match=f"shard store.*{gone.name}.*missing"):
        VolumeStore(moved / "train.h5").names()
    gone.with_suffix(".bak").rename(gone)
    # a volume reset in its shard after merging (a shard re-run) is refused on read
    with VolumeStore(gone) as s:
        victim = s.names()[0]
    with h5py.File(gone, "r+") as f:
        f[victim].attrs.modify("complete", np.uint8(0))
    with VolumeStore(moved / "train.h5") as store:
        assert victim in store.names()  # the merged file still lists it ...
        with pytest.raises(StoreError, match="no longer a complete volume.*merge again"):
            store.read(victim)  # ... but its voxels are not handed out
    # nothing writes into a virtual store (the writes would land in the shards)
    with pytest.raises(StoreError, match="merged virtual store"):
        StoreWriter.open(moved / "train.h5", [victim], StoreSpec((16, 48, 48), {}, ""))
    assert preprocess(_preprocess_args(synthetic_chest, moved / "train.h5")) == 2
    assert "merged virtual store" in caplog.text


# ------------------------------------------------------------------------------ merge: bad inputs

def test_merge_refuses_inputs_that_do_not_belong_together(synthetic_chest, shard_dir, tmp_path, caplog):
    out = str(tmp_path / "m.h5")

    def refused(stores: list[Path | str], message: str, *extra: str) -> None:
        caplog.clear()
        assert merge(["--stores", *map(str, stores), "--out", out, *extra]) == 2
        assert re.search(message, caplog.text), caplog.text
        assert not Path(out).exists()

    s0, s1, s2 = _shards(shard_dir)
    # another preprocessing config: the differing key and both files are named
    other = tmp_path / "other" / "train.h5"
    assert preprocess(_preprocess_args(synthetic_chest, other, "--num_shards", "3", "--shard_index", "2",
                                       "--hu_range", "-1000", "500")) == 0
    refused([s0, s1, shard_path(other, 2, 3)], r"different preprocessing configs \(hu_range: \[-1000\.0, 500\.0\] vs "
                                             r"\[-1000\.0, 1000\.0\]\)")
    # a shard given twice (a copy under another name), a missing shard, shards of another count
    dup = tmp_path / "copy_of_shard0.h5"
    shutil.copy2(s0, dup)
    refused([s0, s1, s2, dup], "are both shard 0 of 3")
    refused([s0, s2], r"shard\(s\) 1 of 3 are missing.*--allow_missing_shards")
    four = tmp_path / "four" / "train.h5"
    assert preprocess(_preprocess_args(synthetic_chest, four, "--num_shards", "4", "--shard_index", "0")) == 0
    refused([s0, s1, s2, shard_path(four, 0, 4)], "different --num_shards")
    # an unsharded store overlapping the shards: the duplicate VolumeName is named with both files
    refused([s0, s1, s2, synthetic_chest / "train.h5"], r"VolumeName\(s\) are in more than one store, e\.g\. \S+ in ")
    # a damaged shard (truncated file), a pattern matching nothing, the output among the inputs
    broken = tmp_path / "broken.shard-1-of-3.h5"
    broken.write_bytes(s1.read_bytes()[:2000])
    refused([s0, broken, s2], f"{broken.name}: cannot be opened as an HDF5 store")
    refused([tmp_path / "nothing-*.h5"], "matches no file")
    refused([s0, s1, s2], "is one of the input stores", "--out", str(s0))
    # missing shards allowed on request: the others are merged, the gap is reported
    caplog.clear()
    assert merge(["--stores", str(s0), str(s2), "--out", out, "--allow_missing_shards"]) == 0
    with VolumeStore(s0) as a, VolumeStore(s2) as b:
        expected = sorted(a.names() + b.names())
    _assert_same_store(synthetic_chest / "train.h5", Path(out), expected)
    assert "merging without shard(s) [1]" in caplog.text


def test_merge_skips_and_lists_incomplete_and_invalid_volumes(synthetic_chest, shard_dir, tmp_path, capsys):
    folder = _copy_shards(shard_dir, tmp_path / "damaged")
    s0, s1, _ = _shards(folder)
    with VolumeStore(s0) as s:
        interrupted = s.names()[0]  # as a killed task leaves it: allocated, complete = 0
    with h5py.File(s0, "r+") as f:
        f[interrupted].attrs.modify("complete", np.uint8(0))
    wrong = next(n for n in [f"zz_{i}.nii.gz" for i in range(100)] if shard_of(n, SHARDS) == 1)
    with h5py.File(s1, "r+") as f:  # a dataset of the wrong shape that claims to be complete
        f.create_dataset(wrong, data=np.zeros((2, 2, 2), np.uint8)).attrs["complete"] = np.uint8(1)
    with VolumeStore(synthetic_chest / "train.h5") as ref:
        expected = [n for n in ref.names() if n != interrupted]
    for mode in ("copy", "virtual"):
        out = tmp_path / f"{mode}.h5"
        capsys.readouterr()
        assert merge(["--stores", str(folder / "train.shard-*.h5"), "--out", str(out), "--mode", mode]) == 0
        printed = capsys.readouterr().out
        assert "2 skipped" in printed
        assert f"skipped {interrupted} ({s0}): incomplete" in printed
        assert f"skipped {wrong} ({s1}): invalid: uint8 (2, 2, 2), the store holds uint8 (16, 48, 48)" in printed
        _assert_same_store(synthetic_chest / "train.h5", out, expected)
        rows = (tmp_path / f"{mode}.h5.skipped.csv").read_text().splitlines()
        assert rows[0] == "store,VolumeName,reason" and len(rows) == 3


def test_copy_merge_resumes_and_follows_changed_shards(synthetic_chest, shard_dir, tmp_path, capsys, caplog):
    folder = _copy_shards(shard_dir, tmp_path / "s")
    out = tmp_path / "m.h5"
    args = ["--stores", str(folder / "train.shard-*.h5"), "--out", str(out)]
    assert merge(args) == 0
    with VolumeStore(out) as s:
        names = s.names()
    with h5py.File(out, "r+") as f:  # an interrupted copy: the volume was allocated, never completed
        f[names[3]].attrs.modify("complete", np.uint8(0))
    with h5py.File(_shards(folder)[shard_of(names[5], SHARDS)], "r+") as f:  # a shard volume redone since
        f[names[5]].attrs.modify("source_path", np.bytes_(b"elsewhere/" + names[5].encode()))
    capsys.readouterr()
    assert merge(args) == 0
    assert f"2 copied, {len(names) - 2} already there" in capsys.readouterr().out
    with VolumeStore(out) as s:
        assert s.names() == names and s.attrs(names[5])["source_path"] == "elsewhere/" + names[5]
    # an output merged from other stores is not silently mixed with these
    assert merge(["--stores", str(_shards(folder)[0]), "--out", str(out), "--allow_missing_shards"]) == 2
    assert "is in no input store: the output was merged from other stores" in caplog.text
    assert merge(["--stores", str(_shards(folder)[0]), "--out", str(out), "--allow_missing_shards",
                  "--overwrite"]) == 0


# --------------------------------------------------------------------------------- the job scripts

def _cluster_doc() -> str:
    return (ROOT / "docs" / "cluster.md").read_text()


def test_flag_checker_catches_a_renamed_flag():
    # the check below must be able to fail: a flag that is not in the parser, direct or through a job
    assert bad_flags(["python scripts/ctclip_merge_stores.py --stores a.h5 --out b.h5 --mode copy"]) == []
    assert bad_flags(["python scripts/ctclip_merge_stores.py --stores a.h5 --output b.h5"]) == [
        "ctclip_merge_stores: --output (in: python scripts/ctclip_merge_stores.py --stores a.h5 --output b.h5)"]
    assert len(bad_flags(["sbatch --array=0-3 scripts/slurm/ctclip_preprocess.sbatch --num_shard 4"])) == 1
    assert len(bad_flags(["srun python -m torch.distributed.run --nnode 2 scripts/ctclip_train.py --use_ddp"])) == 1
    assert bad_flags(["python scripts/ctclip_preprocess.py --hu_range -1000 500 --no-slide_b2u"]) == []


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_script_is_valid_bash_and_calls_existing_flags(path):
    text = path.read_text()
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if path.name != "common.sh":  # (sourced, not run)
        assert "set -euo pipefail" in text and text.startswith("#!/bin/bash")
        usage = logical_lines(text.split("set -euo pipefail")[0], comments=True)
        assert any(f"scripts/slurm/{path.name}" in line for line in usage), "no usage line in the header"
    lines = logical_lines(text, comments=False) + logical_lines(text, comments=True)
    invoked = [inv for line in lines for inv in invocations(line)]
    assert invoked or path.name == "common.sh"
    assert bad_flags(lines) == []


def test_cluster_doc_commands_use_existing_flags():
    section = _cluster_doc()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in logical_lines(block, comments=False)]
    jobs = {t for line in lines for kind, t, _, _ in invocations(line) if kind == "job"}
    assert {"ctclip_preprocess.sbatch", "ctclip_merge.sbatch", "ctclip_train.sbatch",
            "hemorrhage_infer.sbatch"} <= jobs
    assert bad_flags(lines) == []


def _fake_command(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "APPTAINER", "CONTAINER"))}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", CT_TOOLKIT_DIR=str(ROOT),
               PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def test_container_switch(tmp_path):
    # a fake apptainer records its arguments; the jobs must call it with the checkout on PYTHONPATH,
    # --nv for GPU jobs only, and the image; a missing image is refused before anything runs
    log = tmp_path / "apptainer.log"
    _fake_command(tmp_path / "bin", "apptainer", f'printf "%s\\n" "$@" > {log}\n')
    image = tmp_path / "ct-toolkit.sif"
    image.write_bytes(b"")
    env = _job_env(tmp_path, CONTAINER=str(image), SLURM_CPUS_PER_TASK="6")
    for job, gpu, script in (("hemorrhage_prepare.sbatch", False, "hemorrhage_prepare.py"),
                             ("hemorrhage_infer.sbatch", True, "hemorrhage_infer.py")):
        r = subprocess.run(["bash", str(SLURM / job), "--input_dir", "D"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        argv = log.read_text().splitlines()
        assert argv[0] == "exec" and ("--nv" in argv) == gpu
        i = argv.index("--env")
        assert argv[i + 1] == f"PYTHONPATH={ROOT}" and argv[i + 2:i + 5] == [str(image), "python", f"scripts/{script}"]
        assert argv[-2:] == ["--input_dir", "D"]
    assert "--num_workers\n5\n" in log.read_text()  # infer: the task's CPUs minus the main process
    r = subprocess.run(["bash", str(SLURM / "hemorrhage_infer.sbatch")], env={**env, "CONTAINER": "nope.sif"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "CONTAINER=nope.sif: no such image file" in r.stderr


def test_training_jobs_without_a_gpu_say_what_to_set(tmp_path):
    # no GPUS_PER_NODE, no GPU from Slurm and no nvidia-smi: a clear error before anything starts, not a
    # silent exit from `nvidia-smi | wc -l` under pipefail
    env = _job_env(tmp_path)
    env.pop("GPUS_PER_NODE", None)
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())
    for job in ("ctclip_train.sbatch", "hemorrhage_train.sbatch"):
        r = subprocess.run(["bash", str(SLURM / job)], env=env, capture_output=True, text=True)
        assert r.returncode == 2, (job, r.stderr)
        assert "no GPU on this node" in r.stderr and "GPUS_PER_NODE=<processes> and --device cpu" in r.stderr
    # a stand-in nvidia-smi listing two GPUs: the job goes on to start two processes (srun, faked here)
    _fake_command(tmp_path / "bin", "nvidia-smi", 'echo "GPU 0: A (UUID: x)"; echo "GPU 1: B (UUID: y)"\n')
    _fake_command(tmp_path / "bin", "srun", f'printf "%s\\n" "$@" > {tmp_path / "srun.log"}\n')
    r = subprocess.run(["bash", str(SLURM / "hemorrhage_train.sbatch"), "--fold", "2"],
                       env={**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", "SLURM_CPUS_PER_TASK": "8",
                            "SLURM_JOB_ID": "7"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "srun.log").read_text().splitlines()
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("--num_workers") + 1] == "3"  # 8 CPUs / 2 GPUs, minus the rank's main process
    assert argv[-2:] == ["--fold", "2"] and "--resume" in argv and "--use_ddp" in argv


def _submit_pipeline(chest: Path, tmp_path: Path) -> tuple[list[tuple[str, list[str]]], Path, dict[str, str]]:
    """Run submit_ctclip_pipeline.sh against a fake sbatch that records each submission; returns the
    (job script, its arguments) submitted, the store and the environment."""
    calls = tmp_path / "calls"
    calls.mkdir()
    _fake_command(tmp_path / "bin", "sbatch", f"""n=$(ls {calls} | wc -l)
printf "%s\\n" "$@" > {calls}/$n
case $n in 0) echo 101 ;; 1) echo "102;cluster" ;; *) echo 103 ;; esac
""")
    store = tmp_path / "stores" / "train.h5"
    env = _job_env(tmp_path, NUM_SHARDS=str(SHARDS), PREPROCESS_FLAGS="--target_shape 16 48 48", NODES="1")
    r = subprocess.run(["bash", str(SLURM / "submit_ctclip_pipeline.sh"), str(chest / "volumes" / "train"),
                        str(chest / "train_metadata.csv"), str(store),
                        "--txt_filepath", str(chest / "train_reports.csv"), "--output_dir", "runs/x"],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "preprocess array 101 (3 tasks) -> merge 102 -> train 103" in r.stdout
    argv = [(calls / str(i)).read_text().splitlines() for i in range(3)]
    assert "--array=0-2" in argv[0] and "--dependency=afterok:101" in argv[1] and "--dependency=afterok:102" in argv[2]
    jobs = []
    for a in argv:
        j = next(i for i, t in enumerate(a) if t.startswith("scripts/slurm/"))
        jobs.append((a[j], a[j + 1:]))
        assert bad_flags([shlex.join(a)]) == []
    assert [j for j, _ in jobs] == [f"scripts/slurm/{n}" for n in
                                    ("ctclip_preprocess.sbatch", "ctclip_merge.sbatch", "ctclip_train.sbatch")]
    assert jobs[2][1][:2] == ["--ct_filepath", str(store)]
    return jobs, store, env


def test_pipeline_submission(synthetic_chest, tmp_path):
    jobs, store, _ = _submit_pipeline(synthetic_chest, tmp_path)
    assert jobs[1][1] == ["--stores", str(store.parent / "train.shard-*-of-3.h5"), "--out", str(store),
                          "--mode", "copy"]


@pytest.mark.slow
def test_pipeline_jobs_run_as_bash(synthetic_chest, tmp_path):
    """The submitted array tasks and the merge, run as SLURM would run them (one bash per array task,
    the recorded arguments): the merged store equals the unsharded run (~15 s: four Python starts)."""
    jobs, store, env = _submit_pipeline(synthetic_chest, tmp_path)
    for task in range(SHARDS):
        r = subprocess.run(["bash", str(ROOT / jobs[0][0]), *jobs[0][1]], capture_output=True, text=True,
                           env={**env, "SLURM_ARRAY_TASK_ID": str(task), "NUM_WORKERS": "0"})
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(ROOT / jobs[1][0]), *jobs[1][1]], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_store(synthetic_chest / "train.h5", store)
    # outside an array the preprocessing job refuses to start
    r = subprocess.run(["bash", str(ROOT / jobs[0][0]), *jobs[0][1]], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not an array task" in r.stderr


# ------------------------------------------------------------------------------------ the container

def _def_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            assert current not in sections, f"%{current} twice"
            sections[current] = []
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, sections


def test_apptainer_definition():
    header, sections = _def_sections((ROOT / "apptainer" / "ct-toolkit.def").read_text())
    assert list(header)[0] == "Bootstrap" and header["Bootstrap"] == "docker" and header["From"]
    assert {"files", "post", "environment", "runscript", "test", "help"} <= set(sections)
    # %files: relative to the repository root (where the build runs); everything the install needs
    files = dict(line.split() for line in sections["files"] if line.strip())
    for src in files:
        assert (ROOT / src).exists(), f"%files: {src} does not exist"
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11 only)
    readme = re.search(r'^readme = "([^"]+)"', pyproject, flags=re.M).group(1)
    include = re.search(r"^include = \[(.*)\]", pyproject, flags=re.M).group(1)
    packages = {p.strip().strip('"').rstrip("*") for p in include.split(",")}
    assert packages and {"pyproject.toml", "uv.lock", readme, "scripts", "configs", *packages} <= set(files)
    home = {str(Path(dst).parent) for dst in files.values()}
    assert len(home) == 1
    # the paths the runtime sections use are where %files put things
    post = "\n".join(sections["post"])
    assert f"cd {home.pop()}" in post
    runtime = "\n".join(sections["runscript"] + sections["test"] + sections["help"])
    for used in set(re.findall(r"/opt/ct-toolkit/scripts/([\w.]+\.py)", runtime)):
        assert (ROOT / "scripts" / used).is_file(), used
    assert "/opt/ct-toolkit/scripts" in runtime and "/opt/venv/bin" in "\n".join(sections["environment"])
    assert re.search(r"UV_PROJECT_ENVIRONMENT=/opt/venv\b", post)


def test_apptainer_uv_sync_is_valid_for_the_lock(tmp_path):
    """The %post `uv sync` line, run as a dry run against this checkout: the flags exist in uv, the lock
    is used as is (--frozen), and the plan is CUDA torch and the project without the dev extra."""
    uv = shutil.which("uv") or (str(ROOT / ".tools" / "bin" / "uv") if (ROOT / ".tools" / "bin" / "uv").exists() else None)
    if uv is None:
        pytest.skip("uv is not installed")
    _, sections = _def_sections((ROOT / "apptainer" / "ct-toolkit.def").read_text())
    line = next(x.strip() for x in sections["post"] if x.strip().startswith("uv sync"))
    args = shlex.split(line)[2:]
    i = args.index("--python")
    args[i + 1] = sys.executable  # the image's interpreter does not exist here
    assert "--frozen" in args and "--no-dev" in args and not any(a.startswith("--extra") for a in args)
    r = subprocess.run([uv, "sync", *args, "--dry-run", "--offline"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv")}, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = {line.split()[1].split("==")[0] for line in r.stderr.splitlines() if line.startswith(" + ")}
    assert {"torch", "ct-toolkit", "h5py"} <= plan and any(p.startswith("nvidia-") for p in plan)
    assert not plan & {"pytest", "ruff", "vllm"}
    assert not (tmp_path / "venv").exists()


def test_apptainer_runscript_lists_and_runs_scripts(tmp_path):
    _, sections = _def_sections((ROOT / "apptainer" / "ct-toolkit.def").read_text())
    body = "\n".join(sections["runscript"]).replace("/opt/ct-toolkit", str(ROOT))
    _fake_command(tmp_path / "bin", "python", 'printf "%s\\n" "$@"\n')  # the image's python, recorded
    script = tmp_path / "runscript.sh"
    script.write_text(body)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "ctclip_preprocess\n" in r.stderr and "__init__" not in r.stderr
    r = subprocess.run(["sh", str(script), "ctclip_merge_stores", "--help"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == [str(ROOT / "scripts" / "ctclip_merge_stores.py"), "--help"]

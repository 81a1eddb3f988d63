"""The HDF5 store: atomic commits, resumable after SIGKILL at any moment, readers see complete volumes only."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ctclip.data.store import StoreError, VolumeStore
from ctclip.data.store_writer import StoreSpec, StoreWriter
from tests.nifti_cases import write

SPEC = StoreSpec((4, 8, 8), {"a": 1}, "test")


def _vol(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, SPEC.target_shape, dtype=np.uint8)


def test_commit_read_and_hidden_incomplete(tmp_path):
    path = tmp_path / "s.h5"
    names = ["b.nii.gz", "a.nii.gz", "c.nii.gz"]
    with StoreWriter.open(path, names, SPEC) as w:
        assert w.pending(sorted(names)) == sorted(names)
        w.commit("a.nii.gz", _vol(0), {"source_path": "/x/a.nii.gz", "spacing": [1, 2, 3], "rescale": "csv"})
        w.commit("c.nii.gz", _vol(2), {"source_path": "/x/c.nii.gz"})
    with VolumeStore(path) as s:
        assert s.names() == ["a.nii.gz", "c.nii.gz"]  # b exists in the file but is not complete
        assert "b.nii.gz" not in s and "a.nii.gz" in s
        np.testing.assert_array_equal(s.read("a.nii.gz"), _vol(0))
        assert s.tensor("a.nii.gz").dtype == torch.uint8 and s.tensor("a.nii.gz").shape == SPEC.target_shape
        attrs = s.attrs("a.nii.gz")
        assert attrs["source_path"] == "/x/a.nii.gz" and attrs["spacing"] == [1, 2, 3] and attrs["complete"] == 1
        with pytest.raises(KeyError, match="no complete volume named 'b.nii.gz'"):
            s.read("b.nii.gz")
        assert s.file_attrs()["config"] == {"a": 1}
    with h5py.File(path, "r") as f:  # plain h5py (the seed's reader) never finds an unfinished volume by name
        assert "b.nii.gz" not in f and sorted(n for n in f if n != "_pending") == ["a.nii.gz", "c.nii.gz"]
        assert int(f["_pending/b.nii.gz"].attrs["complete"]) == 0 and f["a.nii.gz"].chunks == (1, 8, 8)
        np.testing.assert_array_equal(f["a.nii.gz"][()], _vol(0))


def test_recommitting_a_done_volume_replaces_it(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter.open(path, ["a"], SPEC) as w:
        w.commit("a", _vol(0), {"source_path": "first"})
        w.commit("a", _vol(1), {"source_path": "second"})
    with VolumeStore(path) as s:
        np.testing.assert_array_equal(s.read("a"), _vol(1))
        assert s.attrs("a")["source_path"] == "second"
    assert not (tmp_path / "s.h5.linking").exists()
    with h5py.File(path, "r") as f:  # a finished store holds its volumes and nothing else
        assert list(f) == ["a"]
    (tmp_path / "s.h5.linking").write_text("_pending")  # killed while removing the empty group
    with StoreWriter.open(path, ["a"], SPEC) as w:
        assert w.pending(["a"]) == []
    assert not (tmp_path / "s.h5.linking").exists()


def test_version_1_store_is_upgraded_on_open(tmp_path):
    """A store of the previous layout (pending datasets beside the complete ones) keeps its done volumes;
    the writer moves the unfinished ones out of the volumes' namespace."""
    path = tmp_path / "s.h5"
    with StoreWriter.open(path, ["a", "b"], SPEC) as w:
        w.commit("a", _vol(0), {})
    with h5py.File(path, "r+") as f:  # rebuild the version 1 layout
        f.move("_pending/b", "b")
        del f["_pending"]
        f.attrs["store_version"] = 1
    with VolumeStore(path) as s:  # readable as it is: the reader checks `complete`
        assert s.names() == ["a"]
    with StoreWriter.open(path, ["a", "b"], SPEC) as w:
        assert w.pending(["a", "b"]) == ["b"]
        w.commit("b", _vol(1), {})
    with h5py.File(path, "r") as f:
        assert int(f.attrs["store_version"]) == 2 and sorted(f) == ["a", "b"]  # nothing pending: no group
        np.testing.assert_array_equal(f["a"][()], _vol(0))


@pytest.mark.parametrize("state", ["moved", "not_moved", "both_links", "no_link"])
def test_killed_while_linking_is_recovered(tmp_path, state):
    """The `.linking` marker left by a writer killed while moving a volume's link: the next writer finds
    the volume under exactly one name (its own only when complete) or allocates it again."""
    path = tmp_path / "s.h5"
    with StoreWriter.open(path, ["a", "b", "c"], SPEC) as w:
        w.commit("a", _vol(0), {})
    with h5py.File(path, "r+") as f:
        if state == "both_links":  # the new link written, the old one not yet removed
            f["b"] = f["_pending/b"]
        elif state == "no_link":  # the old link removed, the new one lost
            del f["_pending/b"]
    (tmp_path / "s.h5.linking").write_text("a" if state == "moved" else "b")
    with StoreWriter.open(path, ["a", "b", "c"], SPEC) as w:
        assert w.pending(["a", "b", "c"]) == ["b", "c"]
        w.commit("b", _vol(1), {})
    assert not (tmp_path / "s.h5.linking").exists()
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["_pending", "a", "b"] and sorted(f["_pending"]) == ["c"]
        np.testing.assert_array_equal(f["b"][()], _vol(1))


def test_commit_checks_shape_and_attrs(tmp_path):
    with StoreWriter.open(tmp_path / "s.h5", ["a"], SPEC) as w:
        with pytest.raises(StoreError, match="got float64"):
            w.commit("a", np.zeros(SPEC.target_shape), {})
        with pytest.raises(StoreError, match="unknown volume attributes"):
            w.commit("a", _vol(0), {"colour": "red"})
        with pytest.raises(StoreError, match="longer than"):
            w.commit("a", _vol(0), {"source_path": "x" * 5000})


def test_incompatible_store_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    StoreWriter.open(path, ["a"], SPEC).close()
    with pytest.raises(StoreError, match="shape"):
        StoreWriter.open(path, ["a"], StoreSpec((4, 8, 9), {"a": 1}))
    with pytest.raises(StoreError, match="different preprocessing config"):
        StoreWriter.open(path, ["a"], StoreSpec((4, 8, 8), {"a": 2}))
    StoreWriter.open(path, ["a"], StoreSpec((4, 8, 9), {"a": 2}), overwrite=True).close()


def test_interrupted_extension_is_detected(tmp_path):
    path = tmp_path / "s.h5"
    StoreWriter.open(path, ["a"], SPEC).close()
    (tmp_path / "s.h5.extending").write_text("x")
    with pytest.raises(StoreError, match="interrupted while adding volumes"):
        StoreWriter.open(path, ["a", "b"], SPEC)


def test_reader_is_fork_safe(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter.open(path, ["a"], SPEC) as w:
        w.commit("a", _vol(5), {})
    store = VolumeStore(path)
    store.read("a")  # the parent has a handle open
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own handle, not reuse the parent's
        ok = store._pid != os.getpid() and np.array_equal(store.read("a"), _vol(5)) and store._pid == os.getpid()
        os.write(wfd, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    store.close()


# ------------------------------------------------------------------------- SIGKILL at any moment
def _make_inputs(folder: Path, samples, n: int) -> None:
    import nibabel as nib

    img = nib.load(samples.chest_ct)
    hu = np.asanyarray(img.dataobj)[::4, ::4, ::2].astype(np.int16)
    affine = img.affine @ np.diag([4, 4, 2, 1])
    for i in range(n):
        write(folder / f"train_{i}_a_1.nii.gz", np.roll(hu, 3 * i, axis=1), affine)


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "scripts.ctclip_preprocess", "--ct_data_path", str(src), "--ct_out_path",
            str(out), "--target_shape", "32", "96", "96", "--num_workers", "1"]


def _snapshot(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {"file": {k: np.asarray(v).tolist() for k, v in f.attrs.items()}}

        def add(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()].tobytes(), {k: np.asarray(v).tolist() for k, v in obj.attrs.items()})
            else:
                out[name] = sorted(obj)

        f.visititems(add)
    return out


@pytest.mark.parametrize("trials", [pytest.param(2, id="2-kills"), pytest.param(15, id="15-kills", marks=[pytest.mark.slow, pytest.mark.timeout(1200)])])
def test_sigkill_then_rerun_equals_uninterrupted(samples, tmp_path, trials):
    src = tmp_path / "in"
    _make_inputs(src, samples, 12)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    ref_path = tmp_path / "ref.h5"
    t0 = time.perf_counter()
    subprocess.run(_cmd(src, ref_path), check=True, env=env, capture_output=True)
    duration = time.perf_counter() - t0
    reference = _snapshot(ref_path)
    rng = random.Random(1234)
    for trial in range(trials):
        out = tmp_path / f"k{trial}.h5"
        proc = subprocess.Popen(_cmd(src, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # what a reader sees right after the kill: complete volumes are exact
            with VolumeStore(out) as s:
                for name in s.names():
                    assert s.read(name).tobytes() == reference[name][0]
            with h5py.File(out, "r") as f:  # plain h5py too: every name it finds is a finished volume
                for name in (n for n in f if n != "_pending"):
                    assert f[name][()].tobytes() == reference[name][0]
        subprocess.run(_cmd(src, out), check=True, env=env, capture_output=True)
        assert _snapshot(out) == reference, f"trial {trial}"
        assert not list(tmp_path.glob(".k*partial*"))  # no temp file left behind

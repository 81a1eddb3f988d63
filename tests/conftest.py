"""Shared fixtures and marker handling for the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctcore.samples import Samples, fetch_samples


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def samples() -> Samples:
    """The real sample files, fetched once into the user's cache (verified by sha256)."""
    return fetch_samples()


@pytest.fixture(scope="session")
def synthetic_chest(tmp_path_factory) -> Path:
    """A small synthetic CT-RATE set (10 patients), preprocessed to 16x48x48: train.h5, valid.h5, CSVs."""
    from scripts.ctclip_make_synthetic import main as make_synthetic
    from scripts.ctclip_preprocess import main as preprocess

    d = tmp_path_factory.mktemp("chest")
    assert make_synthetic(["--out_dir", str(d), "--n_patients", "10", "--size", "48", "48", "--slices", "16",
                           "--seed", "3", "--valid_fraction", "0.3"]) == 0
    for split, meta in (("train", "train_metadata.csv"), ("valid", "validation_metadata.csv")):
        assert preprocess(["--ct_data_path", str(d / "volumes" / split), "--ct_out_path", str(d / f"{split}.h5"),
                           "--metadata_path", str(d / meta), "--target_shape", "16", "48", "48",
                           "--num_workers", "0"]) == 0
    return d


@pytest.fixture(scope="session")
def radiological_valid(synthetic_chest) -> Path:
    """synthetic_chest's validation volumes stored in the radiological layout (W patient right->left)."""
    from scripts.ctclip_preprocess import main as preprocess

    out = synthetic_chest / "valid_radiological.h5"
    assert preprocess(["--ct_data_path", str(synthetic_chest / "volumes" / "valid"), "--ct_out_path", str(out),
                       "--metadata_path", str(synthetic_chest / "validation_metadata.csv"), "--target_shape", "16",
                       "48", "48", "--num_workers", "0", "--layout", "radiological"]) == 0
    return out


@pytest.fixture(scope="session")
def synthetic_head(tmp_path_factory) -> Path:
    """A small synthetic RSNA DICOM set (configs/hemorrhage/synthetic_small.yaml with seed 0, which has
    JPEG 2000, RLE and implicit-VR series, BitsStored-12 quirk series, a tilted and a thin series,
    localizers, and a truncated and a pixel-less file): dicom/, labels.csv, studies.csv, truth/."""
    from scripts.hemorrhage_make_synthetic import main as make_synthetic

    out = tmp_path_factory.mktemp("head")
    config = Path(__file__).resolve().parents[1] / "configs" / "hemorrhage" / "synthetic_small.yaml"
    assert make_synthetic(["--config", str(config), "--out_dir", str(out), "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def synthetic_head_truths(synthetic_head) -> list[dict]:
    from hemorrhage.synthetic.head import read_truth

    return [read_truth(p) for p in sorted((synthetic_head / "truth").glob("*.npz"))]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node SLURM cluster (tests/slurm_cluster.py: munged, slurmctld, slurmd in a temporary
    folder, free ports); skipped when the daemons are not installed or do not start."""
    from tests.slurm_cluster import start_or_skip

    cluster = start_or_skip(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()

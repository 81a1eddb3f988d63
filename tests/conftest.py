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


@pytest.fixture(scope="session")
def prepared_head(tmp_path_factory) -> tuple[Path, Path]:
    """10 small synthetic head studies (64 px, 12 slices), prepared once as npz stacks, and their labels:
    what the hemorrhage CNN training tests train on."""
    from scripts.hemorrhage_make_synthetic import main as make_synthetic
    from scripts.hemorrhage_prepare import main as prepare

    root = tmp_path_factory.mktemp("head_prepared")
    config = Path(__file__).resolve().parents[1] / "configs" / "hemorrhage" / "synthetic_small.yaml"
    assert make_synthetic(["--config", str(config), "--out_dir", str(root / "raw"), "--n_studies", "10", "--size",
                           "64", "--slices", "12", "--seed", "5", "--broken", "0"]) == 0
    assert prepare(["--input_dir", str(root / "raw" / "dicom"), "--output_dir", str(root / "prepared"), "--format",
                    "npz", "--num_workers", "0"]) == 0
    return root / "prepared", root / "raw" / "labels.csv"


@pytest.fixture(scope="session")
def sequence_features(tmp_path_factory) -> tuple[Path, Path]:
    """Out-of-fold features files of 16 made-up series (folds 0 and 1) and their labels: the sequence head
    trains on any numbers; no CNN is needed to test its loop."""
    import numpy as np
    import pandas as pd

    from hemorrhage.classes import CLASSES
    from hemorrhage.feature_files import SeriesFeatures, write_series_features

    root = tmp_path_factory.mktemp("sequence_features")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        n = int(rng.integers(8, 20))
        sops = [f"ID_s{i}_{k}" for k in range(n)]
        y = (rng.random((n, 6)) < 0.3).astype(int)
        y[:, 0] = y[:, 1:].max(1)
        rows += [(f"{sop}_{c}", int(y[k, j])) for k, sop in enumerate(sops) for j, c in enumerate(CLASSES)]
        probs = np.clip(y * 0.6 + rng.random((n, 6)) * 0.4, 0.01, 0.99).astype(np.float32)
        feats = (rng.standard_normal((n, 16)) + y[:, :1]).astype(np.float16)
        sf = SeriesFeatures(f"st{i}", f"se{i}", i % 2, "oof", sops, np.arange(n), np.arange(n, dtype=float) * 5.0,
                            [("tiny_densenet", 64)], [feats], [probs], ["0" * 64])
        write_series_features(root / "features" / f"fold{i % 2}" / f"se{i}.npz", sf)
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(root / "labels.csv", index=False)
    return root, root / "labels.csv"

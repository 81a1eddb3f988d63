"""Shared fixtures and marker handling for the test suite."""

from __future__ import annotations

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

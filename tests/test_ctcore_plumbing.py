"""ctcore plumbing: atomic writes (a reader sees the old file or the new one, never half of one) and the
one precision vocabulary."""

from __future__ import annotations

import pytest
import torch

from ctcore.atomic import atomic_write, atomic_write_text
from ctcore.precision import CHOICES, autocast_dtype, autocast_factory, resolve_precision


def test_replaces_whole_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "a.csv"  # the folder is created
    atomic_write_text(path, "old\n")
    seen = []

    def write(tmp):
        tmp.write_text("new\n")
        seen.append((tmp.name, path.read_text()))  # while writing, readers still get the old file

    assert atomic_write(path, write) == path
    assert path.read_text() == "new\n" and seen[0][1] == "old\n" and seen[0][0].startswith(".a.csv.partial-")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.csv"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "{}")

    def half(tmp):
        tmp.write_text('{"cut')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_suffix_for_writers_that_read_it(tmp_path):
    names = []
    atomic_write(tmp_path / "v.nii.gz", lambda tmp: (names.append(tmp.name), tmp.write_bytes(b"x")), suffix=".nii.gz")
    assert names[0].endswith(".nii.gz") and (tmp_path / "v.nii.gz").read_bytes() == b"x"


def test_one_precision_vocabulary_with_the_old_spellings():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert set(CHOICES) >= {"auto", "bf16", "fp16", "fp32", "none"}
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    assert resolve_precision("none", cpu) == resolve_precision("off", cpu) == "fp32"  # --amp none
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp32", cuda) is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_factory("fp16", cpu)  # training: the GradScaler is CUDA's
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp16, fp32, none, off"):
        resolve_precision("half", cpu)
    autocast, scaler = autocast_factory("bf16", cpu)
    with autocast():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16 and scaler is None
    assert autocast_factory("none", cpu)[0]().__class__.__name__ == "nullcontext"


def test_job_errors_share_one_usage_error_base():
    from ctclip.data.reports import TableError
    from ctclip.data.splits import SplitError
    from ctclip.run.evaluate import EvalError
    from ctclip.run.impressions import ImpressionError
    from ctclip.run.merge_stores import MergeError
    from ctclip.run.preprocess import UsageError as PreprocessUsageError
    from ctclip.run.train import SetupError
    from ctcore.errors import UsageError

    assert PreprocessUsageError is UsageError and issubclass(UsageError, ValueError)
    for cls in (TableError, MergeError, SplitError, EvalError, ImpressionError, SetupError):
        assert issubclass(cls, UsageError), cls


def test_toolkit_version_from_a_source_tree(monkeypatch):
    """Run from a source checkout on PYTHONPATH (no install), the scripts that stamp the version in their
    outputs must not crash: ctclip_preprocess did, on a GPU machine with its own Python."""
    from importlib import metadata

    from ctcore import toolkit_version

    assert toolkit_version() == metadata.version("ct-toolkit")

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert toolkit_version() == "unknown (not installed)"

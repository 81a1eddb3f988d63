"""Kaggle ``ID,Label`` files (RSNA 2019): one row per (slice, class), ``ID = <SOPInstanceUID>_<class>``.

    table = read_kaggle_csv(path, "predictions", truth=False)   # KaggleTable: lenient, everything counted
    labels = read_labels("stage_2_train.csv")                  # strict training labels: SOP -> (6,) int8
    frame = kaggle_frame([(sop, probs), ...])                  # -> the ID,Label rows of a submission

`read_kaggle_csv` is evaluation's reader: missing and incomplete slices are kept for the caller to count,
identical repeated rows are collapsed, errors are `UsageError`s naming the file and line. `read_labels`
is training's: every slice must have its six 0/1 rows exactly once (`LabelError` otherwise).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctcore.errors import UsageError
from hemorrhage.classes import CLASSES, split_label_id

log = logging.getLogger(__name__)


@dataclass
class KaggleTable:
    path: Path
    table: pd.DataFrame  # index: SOP UID (str), columns: CLASSES; NaN where the file has no row
    ids: pd.Index  # every distinct ID
    n_rows: int
    n_duplicate_rows: int  # identical repeats, collapsed
    sha256: str

    def complete(self) -> pd.Index:
        return self.table.index[self.table.notna().all(axis=1)]

    def incomplete(self) -> pd.Index:
        return self.table.index[self.table.isna().any(axis=1)]


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (recorded with the inputs an evaluation read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_string_csv(path: Path, role: str) -> pd.DataFrame:
    """Every cell as text (no NaN); a missing or unreadable file is a `UsageError` naming its role."""
    if not Path(path).is_file():
        raise UsageError(f"{role} file {path}: no such file")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError / EmptyDataError are ValueErrors
        raise UsageError(f"{role} file {path}: not a readable CSV ({e})") from e


def _first_bad(df: pd.DataFrame, bad: pd.Series, where: str, what: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        more = f" ({int(bad.sum())} such rows)" if bad.sum() > 1 else ""
        row = f"ID {df['ID'].iat[i]!r}, Label {df['Label'].iat[i]!r}"
        raise UsageError(f"{where}, line {i + 2} ({row}): {what}{more}")


def read_kaggle_csv(path: Path, role: str, truth: bool) -> KaggleTable:
    """Read and check an ``ID,Label`` file; `truth` labels must be 0/1, predictions within [0, 1]."""
    df = read_string_csv(path, role)
    where = f"{role} file {path}"
    missing = [c for c in ("ID", "Label") if c not in df.columns]
    if missing:
        raise UsageError(f"{where}: no column {' or '.join(missing)} (header: {', '.join(map(str, df.columns))}); "
                         "expected ID,Label")
    if df.empty:
        raise UsageError(f"{where}: no rows")
    value = pd.to_numeric(df["Label"].str.strip(), errors="coerce")
    _first_bad(df, value.isna(), where, "Label is not a number")
    if truth:
        _first_bad(df, ~value.isin((0.0, 1.0)), where, "a label must be 0 or 1")
    else:
        _first_bad(df, ~value.between(0.0, 1.0), where, "a probability must be within [0, 1]")
    parts = df["ID"].str.rpartition("_")
    bad_id = (parts[0] == "") | ~parts[2].isin(CLASSES)
    if bad_id.any():
        i = int(np.flatnonzero(bad_id.to_numpy())[0])
        try:
            split_label_id(df["ID"].iat[i])
        except ValueError as e:
            raise UsageError(f"{where}, line {i + 2}: {e} ({int(bad_id.sum())} such rows)") from None
    frame = pd.DataFrame({"ID": df["ID"], "uid": parts[0], "cls": parts[2], "value": value})
    dup = frame.duplicated("ID", keep=False)
    if dup.any():
        conflicting = frame[dup].groupby("ID")["value"].nunique() > 1
        if conflicting.any():
            rid = conflicting.index[conflicting.to_numpy()][0]
            lines = (np.flatnonzero((frame["ID"] == rid).to_numpy()) + 2).tolist()
            raise UsageError(f"{where}: duplicate ID {rid!r} with different Labels on lines {lines}")
        log.warning("%s: %d identical repeated rows collapsed", where, int(frame.duplicated("ID").sum()))
    unique = frame.drop_duplicates("ID")
    table = unique.pivot(index="uid", columns="cls", values="value").reindex(columns=list(CLASSES))
    table.index = table.index.astype(str)
    return KaggleTable(Path(path), table, pd.Index(unique["ID"]), len(df), len(df) - len(unique), sha256(path))


class LabelError(ValueError):
    """A labels file that cannot be used; the message names the file and the row."""


def read_labels(path: str | Path) -> pd.DataFrame:
    """RSNA ``ID,Label`` rows (``<SOP>_<class>``) -> DataFrame indexed by SOP, columns CLASSES, int8."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"ID": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: not a readable CSV ({e})") from e
    missing = [c for c in ("ID", "Label") if c not in df.columns]
    if missing:
        raise LabelError(f"{path}: missing column(s) {', '.join(missing)} (expected the RSNA ID,Label format)")
    if df.empty:
        raise LabelError(f"{path}: no rows")
    values = pd.to_numeric(df["Label"], errors="coerce")
    bad = df.index[values.isna() | ~values.isin([0, 1])]
    if len(bad):
        i = bad[0]
        raise LabelError(f"{path} row {i + 2}: Label {df['Label'].iloc[i]!r} for {df['ID'].iloc[i]} is not 0 or 1 "
                         f"({len(bad)} such rows)")
    sops, classes = [], []
    for i, row_id in enumerate(df["ID"]):
        try:
            sop, cls = split_label_id(row_id)
        except ValueError as e:
            raise LabelError(f"{path} row {i + 2}: {e}") from None
        sops.append(sop)
        classes.append(cls)
    long = pd.DataFrame({"sop": sops, "cls": classes, "y": values.astype(np.int8)})
    dup = long.duplicated(["sop", "cls"])
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise LabelError(f"{path} row {i + 2}: {df['ID'].iloc[i]} appears more than once")
    wide = long.pivot(index="sop", columns="cls", values="y").reindex(columns=list(CLASSES))
    incomplete = wide.index[wide.isna().any(axis=1)]
    if len(incomplete):
        sop = incomplete[0]
        lacking = [c for c in CLASSES if pd.isna(wide.loc[sop, c])]
        raise LabelError(f"{path}: {sop} lacks rows for {', '.join(lacking)} ({len(incomplete)} incomplete slices)")
    return wide.astype(np.int8)


def kaggle_frame(rows: Iterable[tuple[str, Sequence[float]]]) -> pd.DataFrame:
    """(SOPInstanceUID, six values in CLASSES order) per slice -> ID,Label rows, six per slice, in that order."""
    ids: list[str] = []
    values: list[float] = []
    for sop, row in rows:
        ids += [f"{sop}_{c}" for c in CLASSES]
        values += [float(v) for v in row]
    return pd.DataFrame({"ID": ids, "Label": values})

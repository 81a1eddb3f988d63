"""CT-RATE reports and labels CSVs: loading, validation, and the text a model sees.

Empty sections arrive as NaN or the string "Not given."; both become "" (never the string "nan").
`--text_column` keeps the seed's names (reports / impressions / findings) and adds the usual
findings+impressions; a raw CT-RATE column name is accepted too.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ctclip.findings import FINDINGS
from ctcore.errors import UsageError

log = logging.getLogger(__name__)

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
EMPTY_MARKERS = {"", "not given.", "not given", "nan", "none"}
SECTION_TITLES = {
    "ClinicalInformation_EN": "Clinical information",
    "Technique_EN": "Technique",
    "Findings_EN": "Findings",
    "Impressions_EN": "Impression",
}
TEXT_CHOICES: Mapping[str, tuple[str, ...]] = {
    "findings": ("Findings_EN",),
    "impressions": ("Impressions_EN",),
    "findings_impressions": ("Findings_EN", "Impressions_EN"),
    "reports": ("ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"),
}


class TableError(UsageError):
    """A CSV cannot be used; the message names the file, and the column or row."""


def clean_section(value: object) -> str:
    """One report section as text: NaN, None and "Not given." are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text.lower() in EMPTY_MARKERS else text


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{what} {path}: no such file")
    try:
        df = pd.read_csv(path, dtype={"VolumeName": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise TableError(f"{what} {path}: not a readable CSV ({e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        spare = [str(d) for d in df.columns if d not in required]
        near = {c: difflib.get_close_matches(c.lower(), [d.lower() for d in spare], n=1, cutoff=0.75) for c in missing}
        near = {c: [d for d in spare if d.lower() == m[0]] if m else [] for c, m in near.items()}
        hint = "; ".join(f"{c!r} (found {near[c][0]!r}?)" for c in missing if near[c])
        raise TableError(f"{what} {path}: missing column(s) {', '.join(map(repr, missing))}" + (f"; {hint}" if hint else ""))
    bad = df["VolumeName"].isna()
    if bad.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(bad.to_numpy())[:5])
        raise TableError(f"{what} {path}: empty VolumeName on line(s) {rows}")
    dup = df["VolumeName"].duplicated()
    if dup.any():
        log.warning("%s %s: %d duplicate VolumeName rows, keeping the first of each (e.g. %s)",
                    what, path, int(dup.sum()), df.loc[dup, "VolumeName"].iloc[0])
        df = df.loc[~dup]
    return df.set_index("VolumeName", drop=False)


def load_reports(path: str | Path) -> pd.DataFrame:
    """Reports CSV indexed by VolumeName, every section cleaned to a string."""
    df = _read_csv(Path(path), REPORT_COLUMNS, "reports CSV")
    for col in REPORT_COLUMNS[1:]:
        df[col] = df[col].map(clean_section)
    return df


def text_columns(choice: str) -> tuple[str, ...]:
    if choice in TEXT_CHOICES:
        return TEXT_CHOICES[choice]
    if choice in REPORT_COLUMNS[1:]:
        return (choice,)
    raise ValueError(f"unknown text column {choice!r}; choose one of {', '.join([*TEXT_CHOICES, *REPORT_COLUMNS[1:]])}")


def report_text(row: Mapping[str, str], columns: tuple[str, ...]) -> str:
    """The text of one report: one section as it is, several joined with their titles."""
    if len(columns) == 1:
        return row[columns[0]]
    parts = [f"{SECTION_TITLES[c]}: {row[c]}" for c in columns if row[c]]
    return " ".join(parts)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """A report as its sentences (a section title such as "Impression:" stays with its first sentence)."""
    return [t for t in _SENTENCE_END.split(text.strip()) if t]


def sample_sentences(text: str, keep: float, rng: np.random.Generator) -> str:
    """Each sentence kept with probability `keep`, in the report's order; at least one sentence survives.

    Text augmentation for contrastive training on long reports (as CXR-CLIP samples report sentences):
    every draw of a report shows the text tower another subset of its statements, so the tower learns what
    each sentence says instead of recognising whole reports (with a few hundred reports it memorises them
    otherwise), and short texts such as zero-shot prompts are in its training distribution."""
    if keep >= 1.0 or not text:
        return text
    sentences = split_sentences(text)
    chosen = rng.random(len(sentences)) < keep
    if not chosen.any():
        chosen[rng.integers(len(sentences))] = True
    return " ".join(s for s, c in zip(sentences, chosen, strict=True) if c)


def load_labels(path: str | Path) -> pd.DataFrame:
    """Labels CSV indexed by VolumeName with the 18 findings as float columns (NaN kept), in order."""
    df = _read_csv(Path(path), ("VolumeName", *FINDINGS), "labels CSV")
    out = df[list(FINDINGS)].apply(pd.to_numeric, errors="coerce").astype(np.float32)
    bad = out.notna() & ~out.isin([0.0, 1.0])
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise TableError(f"labels CSV {path}: {out.index[r]} has {str(df.iloc[r][FINDINGS[c]])!r} for {FINDINGS[c]!r} "
                         "(labels must be 0, 1 or empty)")
    return out

"""The 18 CT-RATE findings, in the order of the labels CSV columns (DESIGN.md 4.1).

Every part of `ctclip` that reads or writes labels (synthetic data, zero-shot prompts, metrics) uses
this tuple, so the column order is defined once.
"""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

LABEL_COLUMNS: tuple[str, ...] = ("VolumeName", *FINDINGS)


def finding_index(name: str) -> int:
    """Position of `name` in `FINDINGS` (its bit in the synthetic finding masks); ValueError names it."""
    try:
        return FINDINGS.index(name)
    except ValueError:
        raise ValueError(
            f"unknown finding {name!r}; the CT-RATE findings are: {', '.join(FINDINGS)}"
        ) from None

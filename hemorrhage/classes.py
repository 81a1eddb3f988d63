"""The RSNA 2019 intracranial hemorrhage classes and their two orders.

`CLASSES` is the model output order of the first-place solution (``any`` first); `SUBTYPES` are the
five findings without ``any``. `KAGGLE_ROW_ORDER` is the order of the six rows per slice in Kaggle's
``stage_2_train.csv`` (``any`` last). Label rows are ``<SOPInstanceUID>_<class>``.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPES: tuple[str, ...] = CLASSES[1:]
KAGGLE_ROW_ORDER: tuple[str, ...] = SUBTYPES + ("any",)
N_CLASSES = len(CLASSES)

# weight of each class in the competition metric (weighted multi-label log loss), in CLASSES order
CLASS_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def label_id(sop_instance_uid: str, cls: str) -> str:
    """The ``ID`` of one row of a Kaggle label or submission file."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join(CLASSES)}")
    return f"{sop_instance_uid}_{cls}"


def split_label_id(row_id: str) -> tuple[str, str]:
    """Inverse of `label_id`: ``'ID_abc_subdural'`` -> (``'ID_abc'``, ``'subdural'``)."""
    uid, _, cls = row_id.rpartition("_")
    if not uid or cls not in CLASSES:
        raise ValueError(f"not a label id <SOPInstanceUID>_<class>: {row_id!r}")
    return uid, cls

"""DICOM bytes read without pydicom's conversion: header element values, and the pixel element's extent.

    value = element_value(ds, "WindowCenter")      # "40\\80" straight from the bytes, or pydicom's value
    problem = pixel_element_problem(fp, header)    # "" or why the pixel data is missing or cut short

Both serve `hemorrhage.dicom.read_header`, which runs once per file of a dataset: pydicom's per-element
conversion and a full read of the pixel data would each cost more than the header itself. Both are
parity-tested against pydicom (tests/test_hemorrhage_dicom.py).
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian

if TYPE_CHECKING:
    from hemorrhage.dicom import DicomHeader

PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}  # Pixel Data, Float / Double Float
EXPLICIT_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"}
# Where the file position after a stop_before_pixels read is a byte offset into the file and element
# lengths are little endian: native little-endian and encapsulated (compressed) syntaxes; not deflated
# or big-endian files ("" = no file meta, read as implicit little endian).
NATIVE_SYNTAXES = frozenset({"", str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)})
CHECKABLE_SYNTAXES = NATIVE_SYNTAXES | {str(u) for u in AllTransferSyntaxes if UID(u).is_encapsulated}
_BINARY_INTS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}


def element_value(ds: Dataset, keyword: str):
    """The value of an element, read straight from the bytes while pydicom has not converted it yet.

    pydicom converts an element on first access (value validation, DS/IS objects, hooks): about 10 us
    each, so the ~20 elements of a header cost more than decoding a native slice. The header only needs
    numbers and ASCII text (UI, CS, DS, IS and binary integers), which are parsed here directly; an
    element that is already converted, a sequence, or of another VR takes pydicom's value. Returns
    str (backslash-separated for several values), int, a pydicom value, or None when absent or empty.
    The parity test compares every header field with pydicom's conversion on real and synthetic files.
    """
    tag = pydicom.datadict.tag_for_keyword(keyword)
    elem = ds.get_item(tag) if tag is not None else None
    if elem is None:
        return None
    if isinstance(elem, pydicom.DataElement):
        return elem.value
    raw = elem.value
    if not isinstance(raw, bytes):
        return ds[tag].value
    vr = elem.VR or pydicom.datadict.dictionary_VR(tag)
    if vr in _BINARY_INTS:
        size = struct.calcsize(_BINARY_INTS[vr])
        if len(raw) < size:
            return None
        little = ds.original_encoding[1] is not False
        return struct.unpack(("<" if little else ">") + _BINARY_INTS[vr], raw[:size])[0]
    if vr in ("UI", "CS", "DS", "IS", "LO", "SH"):
        return raw.decode("latin-1").strip(" \x00")
    return ds[tag].value


def element_text(ds: Dataset, keyword: str, default: str = "") -> str:
    value = element_value(ds, keyword)
    return default if value is None else str(value).strip()


def split_values(value) -> list:
    if isinstance(value, str):
        return value.split("\\") if value else []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def element_floats(ds: Dataset, keyword: str) -> tuple[float, ...]:
    """All values of a numeric (possibly multi-valued) element; () when absent, empty or malformed."""
    value = element_value(ds, keyword)
    if value is None or value == "":
        return ()
    try:
        return tuple(float(v) for v in split_values(value))
    except (TypeError, ValueError):  # e.g. a DS holding text: treated as absent, never guessed
        return ()


def element_int(ds: Dataset, keyword: str, default: int | None) -> int | None:
    value = element_value(ds, keyword)
    if value is None or value == "":
        return default
    try:
        return int(float(split_values(value)[0]))
    except (TypeError, ValueError, IndexError):
        return default


def native_pixel_bytes(h: DicomHeader) -> int:
    """Bytes an uncompressed Pixel Data element of this header must hold."""
    bits = h.rows * h.columns * h.n_frames * h.bits_allocated
    samples = 3 if h.photometric.startswith(("RGB", "YBR")) else 1
    return samples * ((bits + 7) // 8)


def pixel_element_problem(fp: BinaryIO, h: DicomHeader) -> str:
    """Check the pixel element at fp's position (where stop_before_pixels left it) without reading it.

    Returns "" when it looks complete or cannot be judged cheaply (encapsulated data, deflated or big
    endian syntaxes), else what is wrong: no pixel data, or a file that ends inside the pixel data.
    """
    if not h.is_image or h.transfer_syntax not in CHECKABLE_SYNTAXES:
        return ""
    start = fp.tell()
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    fp.seek(start)
    head = fp.read(12)
    if len(head) < 8:
        return "no pixel data"
    group, element = struct.unpack("<HH", head[:4])
    if (group, element) not in PIXEL_TAGS:
        return ""  # stopped somewhere unexpected: no judgement
    if head[4:6] in EXPLICIT_LONG_VRS and len(head) == 12:
        length, offset = struct.unpack("<I", head[8:12])[0], 12
    else:
        length, offset = struct.unpack("<I", head[4:8])[0], 8
    if length == 0xFFFFFFFF:  # encapsulated: the end is only found by reading all fragments
        return ""
    have = size - start - offset
    if have < length:
        return f"truncated: file ends inside the pixel data ({have} of {length} bytes)"
    if h.transfer_syntax in NATIVE_SYNTAXES and length < native_pixel_bytes(h):
        return f"pixel data holds {length} bytes, Rows x Columns x frames need {native_pixel_bytes(h)}"
    return ""

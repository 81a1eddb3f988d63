"""Reading NIfTI CT volumes: the stored array as it is on disk, validated, and its RAS orientation.

`read_nifti` returns the *unscaled* stored values (dtype as on disk) and the header's own scaling
separately, so that the HU decision (`ctclip.data.rescale`) can see both and never applies a scaling
twice. A .nii.gz is inflated in one call with libdeflate (the `deflate` package, about 2.5x zlib),
falling back to ISA-L (`isal`) for what libdeflate cannot take (several gzip members, > 4 GiB); the
array is a zero-copy view of the decompressed buffer.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import deflate
import nibabel as nib
import numpy as np
from isal import igzip


class VolumeError(ValueError):
    """A volume cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # survives the trip back from a worker process
        return (type(self), (self.path, self.reason))


@dataclass
class NiftiVolume:
    path: Path
    raw: np.ndarray  # stored values, unscaled, shape (X, Y, Z) in on-disk voxel order
    affine: np.ndarray  # voxel -> world (RAS mm), 4x4
    zooms: tuple[float, float, float]  # voxel size in mm along the on-disk axes
    scl_slope: float  # the header's own scaling (1, 0 when unset)
    scl_inter: float

    @property
    def has_own_scaling(self) -> bool:
        return (self.scl_slope, self.scl_inter) != (1.0, 0.0)

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def _header_scaling(header: nib.Nifti1Header) -> tuple[float, float]:
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def _decompress(path: Path, fast: bool = True) -> bytes:
    """The file's bytes, inflated if gzip. `fast` tries libdeflate first, which reads only the first
    gzip member: callers check the length they expect and retry with fast=False (ISA-L, all members)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    if fast:
        try:
            return deflate.gzip_decompress(data)
        except deflate.DeflateError:
            pass  # damage, or a size libdeflate cannot trust: ISA-L decides
    try:
        return igzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        raise VolumeError(path, f"corrupt or truncated gzip stream ({type(e).__name__}: {e})") from e


def _parse_header(path: Path, buffer: bytes) -> nib.Nifti1Header:
    """The header as written (nib.load moves scl_slope/scl_inter out of the header; we need them)."""
    if len(buffer) < 348:
        raise VolumeError(path, f"truncated: {len(buffer)} bytes, shorter than a NIfTI header")
    sizeof_hdr = int(np.frombuffer(buffer[:4], "<i4")[0])
    if sizeof_hdr not in (348, 540, 0x5C010000, 0x1C020000):  # either byte order
        raise VolumeError(path, f"not a readable NIfTI header (sizeof_hdr {sizeof_hdr})")
    klass = nib.Nifti2Header if sizeof_hdr in (540, 0x1C020000) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(buffer[: klass.sizeof_hdr]), check=False)  # no silent fixes
    except Exception as e:  # nibabel raises several types for unreadable headers
        raise VolumeError(path, f"not a readable NIfTI header ({type(e).__name__}: {e})") from e
    magic = bytes(header["magic"]).rstrip(b"\x00")
    if magic not in (b"n+1", b"ni1", b"n+2", b"ni2"):
        raise VolumeError(path, f"not a readable NIfTI header (magic {magic!r})")
    if magic in (b"ni1", b"ni2"):
        raise VolumeError(path, "a .hdr/.img pair, not a single-file NIfTI")
    return header


def read_nifti(path: str | Path) -> NiftiVolume:
    """Read and validate one CT volume. Raises VolumeError naming the file for anything unusable."""
    path = Path(path)
    buffer = _decompress(path)
    header = _parse_header(path, buffer)
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(path, f"expected a 3D volume, got shape {shape}")
    if min(shape) < 1:
        raise VolumeError(path, f"empty volume of shape {shape}")
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise VolumeError(path, f"invalid voxel spacing {zooms} (must be finite and > 0)")
    affine = header.get_best_affine()
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(path, "invalid or singular affine in the header")
    dtype = header.get_data_dtype()
    offset = int(header["vox_offset"])
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if len(buffer) < offset + nbytes:
        buffer = _decompress(path, fast=False)  # a multi-member gzip (bgzip, concatenated streams)
    if len(buffer) < offset + nbytes:
        raise VolumeError(path, f"truncated: {len(buffer) - offset} bytes of voxel data, expected {nbytes}")
    raw = np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape, order="F")
    slope, inter = _header_scaling(header)
    return NiftiVolume(path, raw, np.asarray(affine, dtype=np.float64), zooms, slope, inter)  # type: ignore[arg-type]


def ras_transform(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Orientation transform to the closest canonical (RAS) axes, and the affine after applying it."""
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt("RAS")
    transform = nib.orientations.ornt_transform(ornt, target)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    return transform, new_affine


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip axes so the array is in closest-canonical RAS order. Returns a view (no copy)."""
    transform, new_affine = ras_transform(affine, array.shape)
    return nib.orientations.apply_orientation(array, transform), new_affine

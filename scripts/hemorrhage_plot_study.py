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
import sys

from ctcore import schema
from hemorrhage.run.study_figure import FigureError, StudyFigureConfig, plot_series


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(StudyFigureConfig, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(StudyFigureConfig, plot_series, argv, parser=build_parser(), name="hemorrhage_plot_study",
                           errors=(FigureError,), report=lambda drawn, cfg: print(json.dumps(drawn)))


if __name__ == "__main__":
    sys.exit(main())

"""PNG montages of CT slices with region outlines (planted findings, predicted masks ...).

Both packages draw the same kind of figure: a grid of windowed slices, each with coloured outlines of
named binary regions and a legend. Callers choose slices and windows; this module only draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Panel:
    """One slice to draw: a 2D HU image (rows = anterior->posterior as displayed), a window, outlines."""

    image_hu: np.ndarray
    title: str = ""
    window: tuple[float, float] = (40.0, 400.0)  # (centre, width)
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> 2D bool mask


def window_to_unit(image_hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo = centre - width / 2.0
    return np.clip((np.asarray(image_hu, dtype=np.float32) - lo) / float(width), 0.0, 1.0)


def save_montage(panels: Sequence[Panel], path: str | Path, ncols: int = 4, suptitle: str = "",
                 panel_size: float = 3.2, dpi: int = 110) -> Path:
    """Draw `panels` in a grid with one colour per region name across the figure; write a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not panels:
        raise ValueError("save_montage: no panels to draw")
    names = sorted({n for p in panels for n, m in p.regions.items() if np.any(m)})
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows + 0.8), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels):
        ax.imshow(window_to_unit(p.image_hu, *p.window), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for name, mask in p.regions.items():
            if np.any(mask):
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour[name]], linewidths=1.0)
        ax.set_title(p.title, fontsize=8)
    if names:
        handles = [Line2D([0], [0], color=colour[n], lw=2) for n in names]
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 5), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

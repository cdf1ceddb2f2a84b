"""Writing a matplotlib figure: rendered in memory, written atomically (a local path or an
object), as every artefact of a run directory; and a grid of panels for n plots."""

from __future__ import annotations

import io
from pathlib import Path

from distcl.rundir import atomic_write
from distcl.storage import Uri


def save_png(fig, path: Path | Uri, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, buf.getvalue())


def panel_grid(n: int, max_cols: int, width: float, height: float):
    """(fig, axes) of ``n`` panels of ``width`` x ``height`` inches, at most ``max_cols`` per
    row; the cells beyond ``n`` are hidden. ``axes.flat[:n]`` are the panels."""
    import matplotlib.pyplot as plt

    cols = min(n, max_cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes

"""Writing a matplotlib figure: rendered in memory, written atomically (a local path or an
object), as every artefact of a run directory."""

from __future__ import annotations

import io
from pathlib import Path

from distcl.rundir import atomic_write
from distcl.storage import Uri


def save_png(fig, path: Path | Uri, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, buf.getvalue())

"""Live progress of a run: rank 0 posts to a tiny Ray actor, the driver draws a bar.

Ray Train's ``fit()`` blocks the driver until the run ends; a background thread polls
the board and renders task / epoch / step, the loss terms and images/s with ``rich``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict = {}

    def update(self, **kw) -> None:
        self.state.update(kw)

    def get(self) -> dict:
        return dict(self.state)


def _describe(state: dict) -> str:
    rec = state.get("record") or {}
    terms = " ".join(f"{k[5:]}={v:.3f}" for k, v in rec.items() if k.startswith("loss/"))
    extra = ""
    if rec:
        extra = (
            f" | ep{rec['epoch']} {terms} acc={rec['train_acc']:.3f} "
            f"{rec['images_per_s']:.0f} img/s"
        )
    return f"task {state.get('task', 0) + 1} epoch {state.get('epoch', 0) + 1}{extra}"


@contextmanager
def show_progress(board, title: str, epochs: dict[int, int], enabled: bool = True):
    """While the block runs, poll ``board`` and draw one progress bar over the epochs of every
    task in ``epochs`` (task -> its epochs)."""
    if not enabled:
        yield
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    stop = threading.Event()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    ) as bar:
        tid = bar.add_task(title, total=1.0, info="starting workers...")

        def poll() -> None:
            while not stop.wait(0.5):
                try:
                    st = ray.get(board.get.remote(), timeout=2)
                except Exception:  # board busy or restarting: try again
                    continue
                if not st:
                    continue
                before = sum(e for t, e in epochs.items() if t < st.get("task", 0))
                done = before + st["epoch"] + st["step"] / max(st["steps"], 1)
                frac = done / max(sum(epochs.values()), 1)
                bar.update(tid, completed=min(frac, 1.0), info=_describe(st))

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            bar.update(tid, completed=1.0)

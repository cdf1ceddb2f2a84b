"""Live progress of a run: rank 0 posts to a tiny Ray actor, the driver draws a bar.

Ray Train's ``fit()`` blocks the driver until the run ends; a background thread polls
the board and renders task / epoch / step, the loss terms and images/s with ``rich``, and
hands every task that finishes to ``on_task`` as it finishes (one log line per task, also
without the bar: ``--no-progress``, the logs of a submitted job).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self.state: dict = {}
        self.finished: dict[int, dict] = {}

    def update(self, **kw) -> None:
        self.state.update(kw)

    def task_done(self, task: int, timing: dict) -> None:
        self.finished[task] = timing

    def get(self) -> dict:
        return {**self.state, "finished": dict(self.finished)}


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
def show_progress(board, title: str, epochs: dict[int, int], enabled: bool = True, on_task=None):
    """While the block runs, poll ``board``: draw one progress bar over the epochs of every
    task in ``epochs`` (task -> its epochs) if ``enabled``, and call ``on_task(t, timing)``
    once for each task that finishes."""
    bar, tid = None, None
    if enabled:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        bar.start()
        tid = bar.add_task(title, total=1.0, info="starting workers...")
    stop, told = threading.Event(), set()

    def poll() -> None:
        while not stop.wait(0.5):
            try:
                st = ray.get(board.get.remote(), timeout=2)
            except Exception:  # board busy or restarting: try again
                continue
            for t in sorted(set(st.get("finished", {})) - told):
                told.add(t)
                if on_task is not None:
                    on_task(t, st["finished"][t])
            if bar is None or "epoch" not in st:
                continue
            before = sum(e for t, e in epochs.items() if t < st.get("task", 0))
            done = before + st["epoch"] + st["step"] / max(st["steps"], 1)
            frac = done / max(sum(epochs.values()), 1)
            bar.update(tid, completed=min(frac, 1.0), info=_describe(st))

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield told
    finally:
        stop.set()
        th.join()
        if bar is not None:
            bar.update(tid, completed=1.0)
            bar.stop()

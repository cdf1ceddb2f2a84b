"""Live progress of a run: rank 0 posts to a tiny Ray actor, the driver draws a bar.

One board serves every run of a driver process (:func:`progress_board`: a test session's
runs, a tuning search's trials, which get the search's board), each run on its own page
(:class:`RunProgress`): an actor process per process, not one per run (~1 core-s each).

Ray Train's ``fit()`` blocks the driver until the run ends; a background thread polls
the board and renders task / epoch / step, the loss terms and images/s with ``rich``, and
hands every task that finishes to ``on_task`` as it finishes (one log line per task, also
without the bar: ``--no-progress``, the logs of a submitted job).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest state of each run (by run id) and the tasks it finished."""

    def __init__(self) -> None:
        self.runs: dict[str, dict] = {}

    def update(self, run: str, **kw) -> None:
        self.runs.setdefault(run, {}).update(kw)

    def task_done(self, run: str, task: int, timing: dict) -> None:
        self.runs.setdefault(run, {}).setdefault("finished", {})[task] = timing

    def get(self, run: str) -> dict:
        state = self.runs.get(run, {})
        return {**state, "finished": dict(state.get("finished", {}))}

    def end(self, run: str) -> None:
        self.runs.pop(run, None)


_boards: dict[tuple[str, str], Any] = {}


def progress_board():
    """This process's board in the Ray it is connected to, made on first use; it ends with
    this process (its owner) or that Ray session."""
    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), ctx.get_node_id())  # a new Ray session: a new board
    if key not in _boards:
        _boards.clear()
        _boards[key] = ProgressBoard.remote()
    return _boards[key]


@dataclass(frozen=True)
class RunProgress:
    """One run's page of a board: rank 0 posts to it, the driver polls it (picklable)."""

    board: Any  # a ProgressBoard handle
    run: str

    def update(self, **kw) -> None:
        self.board.update.remote(self.run, **kw)

    def task_done(self, task: int, timing: dict) -> None:
        self.board.task_done.remote(self.run, task, timing)

    def get(self) -> ray.ObjectRef:
        return self.board.get.remote(self.run)

    def end(self) -> None:
        self.board.end.remote(self.run)


def _describe(state: dict) -> str:
    rec = state.get("record") or {}
    terms = " ".join(f"{k[5:]}={v:.3f}" for k, v in rec.items() if k.startswith("loss/"))
    extra = ""
    if rec:
        extra = (
            f" | ep{rec['epoch']} {terms} acc={rec['train_acc']:.3f} "
            f"{rec['new_images_per_s']:.0f} new img/s"
        )
    return f"task {state.get('task', 0) + 1} epoch {state.get('epoch', 0) + 1}{extra}"


@contextmanager
def show_progress(
    page: RunProgress, title: str, epochs: dict[int, int], enabled: bool = True, on_task=None
):
    """While the block runs, poll the run's ``page``: draw one progress bar over the epochs
    of every task in ``epochs`` (task -> its epochs) if ``enabled``, and call
    ``on_task(t, timing)`` once for each task that finishes."""
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
                st = ray.get(page.get(), timeout=2)
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
        page.end()
        if bar is not None:
            bar.update(tid, completed=1.0)
            bar.stop()

"""The run directory of one job: its layout, its completion markers, its lock, and the one
atomic write that every artefact goes through.

    rd = RunDir("runs/quickstart")
    with rd.lock():                       # one process per run dir; names the holder
        rd.clean_temp()                   # leftovers of a killed writer
        atomic_write(rd.metrics_json, json.dumps(m))
        rd.finished_tasks()               # leading tasks whose end-of-task work is done

Layout::

    job.yaml  scenario.json  metrics.json  report.md  *.png
    models/<t>/{model.pt, meta.json, history.json}   trained (meta.json written last)
    models/<t>/done.json                             end-of-task work finished
    gallery/model=<t>/part-<rank>.parquet            items arriving at t, embedded by t
    eval/embeddings/model=<t>/part-<rank>.parquet    the evaluation set embedded by t
    eval/rows/<t>.json                               row t of every matrix
    memory/                                          the episodic memory service's files
    ray/                                             Ray Train's storage (checkpoints)

A write is atomic: a temp name beside the target (``.tmp-*``), fsync, ``os.replace``, then an
fsync of the folder, so a crash leaves the previous version or the new one, never half.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temp name, fsync, rename, folder fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **kw: Any) -> Path:
    return atomic_write(path, json.dumps(obj, **kw))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temp folder, then move it into ``path`` (replacing a stale one) on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_temp(root: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders a killed writer left under ``root``."""
    removed = []
    for p in sorted(Path(root).rglob(f"{TEMP_PREFIX}*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class RunDir:
    """The layout of one run directory (paths only; nothing is created until written)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()  # absolute: Ray workers run in another cwd

    # -- files and folders ---------------------------------------------------------
    job_yaml = property(lambda self: self.root / "job.yaml")
    scenario_json = property(lambda self: self.root / "scenario.json")
    metrics_json = property(lambda self: self.root / "metrics.json")
    report_md = property(lambda self: self.root / "report.md")
    gallery = property(lambda self: self.root / "gallery")
    eval_embeddings = property(lambda self: self.root / "eval" / "embeddings")
    eval_rows = property(lambda self: self.root / "eval" / "rows")
    memory = property(lambda self: self.root / "memory")
    ray_storage = property(lambda self: self.root / "ray")

    def model(self, task: int) -> Path:
        return self.root / "models" / str(task)

    # -- completion markers --------------------------------------------------------
    def trained(self, task: int) -> bool:
        """Model ``task`` is saved (``meta.json`` is written last)."""
        return (self.model(task) / "meta.json").is_file()

    def done(self, task: int) -> bool:
        """Task ``task`` is finished: trained and its end-of-task work written."""
        return (self.model(task) / "done.json").is_file()

    def mark_done(self, task: int, info: dict) -> None:
        atomic_write_json(self.model(task) / "done.json", info)

    def finished_tasks(self) -> int:
        """How many leading tasks are finished (0, 1, ... T)."""
        t = 0
        while self.done(t):
            t += 1
        return t

    # -- one process at a time -----------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``.lock`` (flock: released by the kernel whatever kills the holder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirBusy(
                    f"{self.root}: in use by another distcl process ({holder}); wait for it "
                    "or stop it (two runs of one job would overwrite each other)"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(fd)

    def clean_temp(self) -> list[Path]:
        return clean_temp(self.root) if self.root.exists() else []

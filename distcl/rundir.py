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

The root is a local path (or a shared file system) or an object-store URI
(``output.root: s3://bucket/runs``, see :mod:`distcl.storage`); every artefact is read and
written through :mod:`distcl.storage`, so the layout above is the same on both.

A write is atomic: locally a temp name beside the target (``.tmp-*``), fsync, ``os.replace``,
then an fsync of the folder, so a crash leaves the previous version or the new one, never
half; on an object store one upload of the complete object (visible only once complete). A
folder of several files (``models/<t>/``) counts only once its last file (``meta.json``) is
written, so on an object store it is written file by file with that one last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distcl import storage
from distcl.storage import TEMP_PREFIX, Loc, Uri, _fsync_dir


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class CheckpointError(ValueError):
    """A checkpoint does not belong to this job or does not fit this architecture."""


class NotARunDir(ValueError):
    """A folder given as a run directory is not one (or lacks what the command reads)."""


def read_meta(model_dir: str | Path | Uri) -> dict:
    """A finished model folder's ``meta.json`` (``models/<t>/``, distcl.train.modeling)."""
    path = storage.join(model_dir, "meta.json")
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{model_dir}: not a finished model folder (no meta.json)") from None


def _temp_name(path: Path) -> Path:
    return path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}"


def atomic_write(path: str | os.PathLike | Uri, data: bytes | str) -> Loc:
    """Write ``data`` to ``path`` atomically (local: temp name, fsync, rename, folder fsync;
    object store: one upload)."""
    return storage.write_bytes(path, data)


def atomic_write_json(path: str | os.PathLike | Uri, obj: Any, **kw: Any) -> Loc:
    return atomic_write(path, json.dumps(obj, **kw))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike | Uri, last: str | None = None) -> Iterator[Path]:
    """Fill a temp folder, then move it into ``path`` (replacing a stale one) on success.

    On an object store (no rename) the files are uploaded one by one after the old folder's
    objects are deleted, ``last`` (the file whose presence says "complete") at the end."""
    path = storage.location(path)
    if isinstance(path, Uri):
        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
            yield Path(tmp)
            storage.delete_dir(path)
            names = sorted(p.name for p in Path(tmp).iterdir())
            for name in sorted(names, key=lambda n: n == last):
                storage.upload(Path(tmp) / name, path / name)
        return
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


def clean_temp(root: str | os.PathLike | Uri) -> list[Path]:
    """Remove the temp files and folders a killed writer left under ``root`` (an object
    store has none: an object is written whole or not at all)."""
    removed = []
    if isinstance(root, Uri):
        return removed
    for p in sorted(Path(root).rglob(f"{TEMP_PREFIX}*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


class RunDir:
    """The layout of one run directory (paths only; nothing is created until written).

    ``root`` is a local ``Path`` (made absolute: Ray workers run in another cwd) or a
    :class:`~distcl.storage.Uri`; every location below has the same type as the root."""

    def __init__(self, root: str | os.PathLike | Uri):
        loc = storage.location(root)
        self.root: Loc = loc if isinstance(loc, Uri) else loc.resolve()

    @property
    def is_remote(self) -> bool:
        """The run dir is on an object store (no flock, no rename; see :meth:`lock`)."""
        return isinstance(self.root, Uri)

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

    def model(self, task: int) -> Loc:
        return self.root / "models" / str(task)

    def history_json(self, task: int) -> Loc:
        return self.model(task) / "history.json"

    def row_json(self, task: int) -> Loc:
        """Row ``task`` of every matrix (``distcl.eval.evaluate``'s cache)."""
        return self.eval_rows / f"{task}.json"

    # -- reading what a run wrote ----------------------------------------------------
    def require(self, *what: str) -> RunDir:
        """``self`` if the folder is a run directory holding ``what`` (names of the
        properties above, e.g. ``"metrics_json"``); else :class:`NotARunDir` naming the
        folder and what is missing."""
        if not storage.is_file(self.job_yaml):
            missing = "the folder does not exist" if not storage.exists(self.root) else (
                "no job.yaml")  # fmt: skip
            raise NotARunDir(f"{self.root}: not a run directory ({missing})")
        for name in what:
            loc = getattr(self, name)
            if not storage.exists(loc):
                rel = storage.relative(loc, self.root)
                raise NotARunDir(f"{self.root}: no {rel} in this run directory")
        return self

    def load_job(self):
        """The resolved job this run directory belongs to (``job.yaml``)."""
        import yaml

        from distcl.config import parse_job

        path = self.require().job_yaml
        return parse_job(yaml.safe_load(storage.read_text(path)) or {}, str(path))

    def load_scenario(self):
        """The run's scenario (``scenario.json``)."""
        from distcl.data.scenario import Scenario

        return Scenario.from_json(storage.read_json(self.require("scenario_json").scenario_json))

    def history(self, task: int) -> list[dict]:
        """Task ``task``'s per-epoch records ([] before it is trained)."""
        path = self.history_json(task)
        return storage.read_json(path) if storage.is_file(path) else []

    def ray_storage_args(self) -> dict:
        """``RunConfig`` keyword arguments placing Ray Train's checkpoints in ``ray/``
        (:func:`distcl.storage.ray_storage`)."""
        return storage.ray_storage(self.ray_storage)

    # -- completion markers --------------------------------------------------------
    def trained(self, task: int) -> bool:
        """Model ``task`` is saved (``meta.json`` is written last)."""
        return storage.is_file(self.model(task) / "meta.json")

    def done(self, task: int) -> bool:
        """Task ``task`` is finished: trained and its end-of-task work written."""
        return storage.is_file(self.model(task) / "done.json")

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
        """Hold ``.lock`` (flock: released by the kernel whatever kills the holder).

        An object store has no flock. There the lock is (1) a flock on a driver-local file
        named by a hash of the URI (``$TMPDIR/distcl-locks/<sha>.lock``), which excludes a
        second run of the same URI from this machine exactly as locally, plus (2) an object
        ``<root>/.lock`` naming the holder (pid, host, time), written after (1) is held and
        deleted on release. A run from another machine that finds a lock object of a
        different host refuses to start and names it. Not guaranteed: two machines that
        start within one round trip of each other can both pass (S3 offers no
        compare-and-swap through pyarrow), and a holder killed on another machine leaves
        its object behind: delete it by hand once that run is gone (the error says so).
        Same machine: the flock decides, so a stale object of this host is overwritten.
        """
        if self.is_remote:
            yield from self._remote_lock()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        yield from self._flock(self.root / ".lock", self.root)

    @staticmethod
    def _flock(path: Path, name: Loc) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirBusy(
                    f"{name}: in use by another distcl process ({holder}); wait for it "
                    "or stop it (two runs of one job would overwrite each other)"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(fd)

    def _remote_lock(self) -> Iterator[None]:
        folder = Path(tempfile.gettempdir()) / "distcl-locks"
        folder.mkdir(parents=True, exist_ok=True)
        local = folder / f"{hashlib.sha256(str(self.root).encode()).hexdigest()[:24]}.lock"
        with contextlib.contextmanager(self._flock)(local, self.root):
            obj = self.root / ".lock"
            host = socket.gethostname()
            try:
                theirs = storage.read_json(obj)
            except (FileNotFoundError, ValueError):
                theirs = None
            if isinstance(theirs, dict) and theirs.get("host") != host:
                raise RunDirBusy(
                    f"{self.root}: in use by a distcl process on another machine "
                    f"(pid {theirs.get('pid')} on {theirs.get('host')} since "
                    f"{theirs.get('since')}); if that run is gone, delete {obj} and retry"
                )
            storage.write_json(obj, {"pid": os.getpid(), "host": host,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())})  # fmt: skip
            try:
                yield
            finally:
                storage.delete(obj)

    def clean_temp(self) -> list[Path]:
        if self.is_remote:
            return []
        return clean_temp(self.root) if self.root.exists() else []

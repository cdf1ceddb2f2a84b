"""The episodic memory service: ``memory.shards`` Ray actors, each owning the classes
``c % shards == shard``, persisted one file per task and shard, restarted from disk.

Files under ``<run>/memory/`` (written once, atomically; never rewritten; a local folder or an
object-store prefix, through :mod:`distcl.storage`)::

    task0003-shard01.npz        the exemplars of task 3 of shard 1's classes, priority order
    means-task3-shard01.npz     per-class sums and counts of task 3's embedded items (E_c)

A shard (:class:`MemoryShard`, plain Python, unit-testable without Ray) loads its files when it
starts, so an actor restart (``max_restarts``: ``__init__`` runs again) sees exactly what was
committed. The class-balanced budget is applied when reading (old classes shrink as classes
arrive, by priority), so a commit only ever adds a file. Writes are idempotent (a task's file
or a means key that exists is not written again), as retried actor calls need.

:class:`MemoryService` is what the engine holds: the shards' handles (picklable, so the
Train workers get it in their config). A worker takes the whole memory once per task
(``snapshot``: zero-copy object refs within a node) and samples replay rows locally with
``distcl.memory.selection.balanced_sample``: no actor call per training step. Exemplar
selection runs on the shard that owns the class (``select``); only the chosen items' images
are sent to it (``commit``).

Test: ``.venv/bin/python -m pytest tests/test_memory_service.py -q``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
from typing import Any

import numpy as np
import ray

from distcl import storage
from distcl.memory.selection import (
    balanced_sample,
    per_class_budget,
    select_exemplars,
)
from distcl.placement import node_id
from distcl.rundir import atomic_write

_TASK_FILE = re.compile(r"task(\d+)-shard(\d+)\.npz$")
_KEYS = ("ids", "images", "labels", "tasks", "embeddings")


class MemoryFileError(RuntimeError):
    """A memory file cannot be read (the message names it)."""


def _load_npz(path: str | storage.Loc) -> dict[str, np.ndarray]:
    try:
        loc = storage.location(path)
        src = io.BytesIO(storage.read_bytes(loc)) if storage.is_uri(loc) else loc
        with np.load(src, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, truncated arrays, ...
        raise MemoryFileError(
            f"{path}: damaged memory file ({type(e).__name__}: {e}); delete it and re-run to "
            "select that task's exemplars again"
        ) from None


def _save_npz(path: str | storage.Loc, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


class MemoryShard:
    """The exemplars and running class means of one shard's classes (see the module doc).

    ``per_class`` and/or ``total`` set the budget (the smaller wins); with ``total`` the budget
    is ``total // classes seen`` and the number of classes seen (over every shard) is given to
    ``commit`` and kept in its file.
    """

    def __init__(
        self,
        path: str | None,
        shard: int = 0,
        shards: int = 1,
        per_class: int | None = None,
        total: int | None = None,
        seed: int = 0,
    ):
        per_class_budget(0, per_class, total)  # validates the budget
        if not 0 <= shard < shards:
            raise ValueError(f"shard must be in [0, {shards}), got {shard}")
        self.path, self.shard, self.shards = path, shard, shards
        self.per_class, self.total, self.seed = per_class, total, seed
        self.tasks: dict[int, dict[str, np.ndarray]] = {}  # task -> its committed rows
        self.sums: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (sums, counts)
        if path is not None:
            folder = storage.location(path)
            storage.makedirs(folder)
            names = [e.name for e in storage.listdir(folder) if not e.is_dir]
            for f in sorted(
                n for n in names if fnmatch.fnmatchcase(n, f"task*-shard{shard:02d}.npz")
            ):
                self.tasks[int(_TASK_FILE.search(f).group(1))] = _load_npz(folder / f)
            for f in sorted(
                n for n in names if fnmatch.fnmatchcase(n, f"means-*-shard{shard:02d}.npz")
            ):
                z = _load_npz(folder / f)
                self.sums[str(z["key"])] = (z["sums"], z["counts"])

    def owns(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels) % self.shards == self.shard

    # ------------------------------------------------------------------ writes
    def commit(self, task: int, ids, images, labels, embeddings=None,
               classes_seen: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Store task ``task``'s exemplars of this shard's classes (rows in priority order
        per class); ids stored by an earlier task are skipped. Once per task: a task already
        committed is left as it is (``changed: False``)."""
        ids = np.asarray([str(i) for i in ids], dtype=str)
        images, labels = np.asarray(images), np.asarray(labels, np.int64)
        n = len(ids)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
            raise ValueError(f"images must be uint8 (N, C, H, W) with N={n}, got "
                             f"{images.dtype} {images.shape}")  # fmt: skip
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
        if embeddings is not None and np.shape(embeddings)[0] != n:
            raise ValueError(f"embeddings must be (N, D) with N={n}, got {np.shape(embeddings)}")
        if task in self.tasks:
            return {**self.stats(), "added": 0, "changed": False}
        stored = set(self._all()["ids"].tolist())
        _, first = np.unique(ids, return_index=True)
        keep = np.array([i for i in sorted(first) if ids[i] not in stored], dtype=np.int64)
        keep = keep[self.owns(labels[keep])] if len(keep) else keep
        keep = keep[np.argsort(labels[keep], kind="stable")]  # by class, priority kept
        emb = np.zeros((n, 0), np.float32) if embeddings is None else np.asarray(embeddings)
        rows = {
            "ids": ids[keep], "images": images[keep], "labels": labels[keep],
            "tasks": np.full(len(keep), task, np.int32), "embeddings": emb[keep].astype(np.float32),
            "classes_seen": np.int64(-1 if classes_seen is None else classes_seen),
        }  # fmt: skip
        if self.path is not None:
            _save_npz(storage.join(self.path, f"task{task:04d}-shard{self.shard:02d}.npz"), rows)
        self.tasks[task] = rows
        return {**self.stats(), "added": len(keep), "changed": True}

    def update_class_sums(self, sums, counts, key: str) -> bool:
        """Fold per-class sums (C, D) and counts (C,) of embedded items (all-reduced over the
        Train ranks) into E_c, this shard's classes only. Idempotent by ``key``."""
        if key in self.sums:
            return False
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        mine = self.owns(np.arange(len(counts)))
        sums, counts = np.where(mine[:, None], sums, 0.0), np.where(mine, counts, 0.0)
        if self.path is not None:
            name = f"means-{key}-shard{self.shard:02d}.npz"
            _save_npz(storage.join(self.path, name), {"key": np.array(key), "sums": sums,
                                                       "counts": counts})  # fmt: skip
        self.sums[key] = (sums, counts)
        return True

    def update_class_means(self, labels, embeddings, key: str) -> bool:
        """``update_class_sums`` from raw rows (labels (N,), embeddings (N, D))."""
        labels, emb = np.asarray(labels, np.int64), np.asarray(embeddings, np.float64)
        sums = np.zeros((int(labels.max(initial=-1)) + 1, emb.shape[1]))
        np.add.at(sums, labels, emb)
        return self.update_class_sums(sums, np.bincount(labels, minlength=len(sums)), key)

    def select(self, labels, embeddings, per_class: int, policy: str, seed: int) -> np.ndarray:
        """Exemplar selection on the shard (``select_exemplars``): candidate rows to keep, by
        class then priority. Stores nothing."""
        chosen = select_exemplars(labels, embeddings, per_class, policy, seed)
        rows = [chosen[c] for c in sorted(chosen)]
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    # ------------------------------------------------------------------- reads
    def budget(self) -> int:
        seen = [int(r["classes_seen"]) for _, r in sorted(self.tasks.items())]
        n_seen = seen[-1] if seen and seen[-1] >= 0 else len(set(self._all()["labels"].tolist()))
        return per_class_budget(n_seen, self.per_class, self.total)

    def _all(self) -> dict[str, np.ndarray]:
        parts = [r for _, r in sorted(self.tasks.items())]
        if not parts:
            return {"ids": np.zeros(0, str), "images": np.zeros((0, 0, 0, 0), np.uint8),
                    "labels": np.zeros(0, np.int64), "tasks": np.zeros(0, np.int32),
                    "embeddings": np.zeros((0, 0), np.float32)}  # fmt: skip
        if len({p["embeddings"].shape[1] for p in parts}) > 1:  # model.upgrades: sizes differ
            parts = [{**p, "embeddings": np.zeros((len(p["ids"]), 0), np.float32)} for p in parts]
        return {k: np.concatenate([p[k] for p in parts]) for k in _KEYS}

    def content(self) -> dict[str, np.ndarray]:
        """Every kept exemplar, by class then priority (the first ``budget`` of each class)."""
        rows = self._all()
        if len(rows["labels"]) == 0:
            return rows
        order = np.argsort(rows["labels"], kind="stable")  # by class; task order = priority
        labels = rows["labels"][order]
        rank = np.arange(len(labels)) - np.searchsorted(labels, labels)  # position in class
        keep = order[rank < self.budget()]
        return {k: v[keep] for k, v in rows.items()}

    def sample(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """A seeded class-balanced batch of ``n`` exemplars (``balanced_sample``)."""
        st = self.content()
        rows = balanced_sample(st["labels"], n, np.random.default_rng(int(seed)))
        return {k: v[rows] for k, v in st.items()}

    def running_class_means(self, dim: int | None = None) -> dict[int, np.ndarray]:
        """CVS's E_c: the mean (float32 (D,)) of every embedded item of each class; ``dim``:
        of the items embedded in that size only (after ``model.upgrades`` changed it)."""
        parts = [(s, c) for s, c in self.sums.values() if dim is None or s.shape[1] == dim]
        if not parts:
            return {}
        sums = sum(s for s, _ in parts)
        counts = sum(c for _, c in parts)
        return {int(c): (sums[c] / counts[c]).astype(np.float32) for c in np.flatnonzero(counts)}

    def stats(self) -> dict[str, Any]:
        st = self.content()
        cls, n = np.unique(st["labels"], return_counts=True)
        return {"n": len(st["ids"]), "per_class": dict(zip(cls.tolist(), n.tolist(), strict=True)),
                "budget_per_class": self.budget(), "tasks": sorted(self.tasks),
                "bytes": int(sum(v.nbytes for v in st.values()))}  # fmt: skip

    def node(self) -> str | None:
        """The Ray node this shard runs on (None outside Ray)."""
        return node_id()

    def digest(self) -> str:
        """sha256 of the content and the class means (equal content, equal digest)."""
        h = hashlib.sha256()
        for k, v in self.content().items():
            h.update(k.encode() + np.ascontiguousarray(v).tobytes())
        for c, m in sorted(self.running_class_means().items()):
            h.update(f"{c}".encode() + m.tobytes())
        return h.hexdigest()

    def ping(self) -> bool:
        return True


# --------------------------------------------------------------------- the Ray service
MemoryActor = ray.remote(MemoryShard)


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if len(p["labels"])]
    if not parts:
        return MemoryShard(None, per_class=1)._all()
    out = {k: np.concatenate([p[k] for p in parts]) for k in _KEYS}
    order = np.argsort(out["labels"], kind="stable")  # by class (balanced_sample needs it)
    return {k: v[order] for k, v in out.items()}


class MemoryService:
    """The handles of a run's memory shards, with the calls the engine makes (picklable)."""

    def __init__(self, actors: list):
        self.actors = actors

    def _owner(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels) % len(self.actors)

    def snapshot(self) -> dict[str, np.ndarray]:
        """The whole memory, by class (one call per shard; once per task per worker)."""
        return _merge(ray.get([a.content.remote() for a in self.actors]))

    def running_class_means(self, dim: int | None = None) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for part in ray.get([a.running_class_means.remote(dim) for a in self.actors]):
            out.update(part)
        return out

    def update_class_sums(self, sums, counts, key: str) -> None:
        ray.get([a.update_class_sums.remote(sums, counts, key) for a in self.actors])

    def select(self, labels, embeddings, per_class: int, policy: str, seed: int) -> np.ndarray:
        """Rows of the candidates to keep; each shard selects its own classes."""
        owner = self._owner(labels)
        refs = []
        for s, a in enumerate(self.actors):
            idx = np.flatnonzero(owner == s)
            refs.append((idx, a.select.remote(labels[idx], embeddings[idx], per_class, policy,
                                              seed)))  # fmt: skip
        rows = [idx[ray.get(r)] for idx, r in refs]
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def commit(self, task: int, ids, images, labels, embeddings, classes_seen: int) -> None:
        ids, labels = np.asarray(ids), np.asarray(labels)
        owner = self._owner(labels)
        ray.get([
            a.commit.remote(task, ids[owner == s], images[owner == s], labels[owner == s],
                            embeddings[owner == s], classes_seen)
            for s, a in enumerate(self.actors)
        ])  # fmt: skip

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])


SHARD_MEMORY = 64 * 2**20  # bytes of node memory reserved per memory shard (a placement hint)


def actor_name(run_name: str, shard: int = 0) -> str:
    return f"memory-{run_name}-{shard}"


def create_memory_service(run_name: str, path: str, per_class: int | None = None,
                          total: int | None = None, seed: int = 0, shards: int = 1,
                          namespace: str = "distcl") -> MemoryService:  # fmt: skip
    """Create (or get) the run's ``shards`` named memory actors. Restarts reload from
    ``path`` (on a cluster: shared storage); calls are retried (writes are idempotent)."""
    from distcl.placement import spread_options, worker_nodes

    per_class_budget(0, per_class, total)  # fail in the caller, not in an actor
    # Shard s on worker node s mod n (off the head; on the head of a one-node Ray); a shard
    # whose node is lost restarts on another one and reloads its files.
    nodes = worker_nodes(ray.nodes(), gpu=False)
    actors = [
        MemoryActor.options(
            name=actor_name(run_name, s), namespace=namespace, get_if_exists=True,
            max_restarts=-1, max_task_retries=-1,
            num_cpus=0,  # a light service: it must not take a Train worker's CPU
            # A resource request, so that the placement holds: Ray puts an actor that asks
            # for nothing on a random node, whatever its scheduling strategy.
            memory=SHARD_MEMORY,
            **spread_options(s, nodes),
        ).remote(path if storage.is_uri(path) else os.path.abspath(path), s, shards,
                 per_class, total, seed)
        for s in range(shards)
    ]  # fmt: skip
    return MemoryService(actors)


def kill_memory_service(service: MemoryService) -> None:
    for a in service.actors:
        ray.kill(a, no_restart=True)

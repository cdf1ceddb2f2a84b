"""The episodic memory service: ``memory.shards`` Ray actors, each owning the classes
``c % shards == shard``, persisted one file per task and shard, restarted from disk.

Files under ``<run>/memory/`` (written once, atomically; never rewritten; a local folder or an
object-store prefix, through :mod:`distcl.storage`)::

    task0003-shard01.npz        the exemplars of task 3 of shard 1's classes, priority order
    means-task3-shard01.npz     per-class sums and counts of task 3's embedded items (E_c)
    compact-t0040-shard01.npz   compaction: the exemplars the budget kept after task 40, and
                                the class sums folded so far (with the keys they hold)

Compaction keeps the disk bounded by the budget, not by the number of tasks: when the stored
rows reach twice the rows the budget keeps (the budget per class shrinks as classes arrive,
and a recurring class adds rows beyond it), or more than ``MEANS_FILES`` class-sum files
exist, the shard writes what it keeps as one ``compact-t<t>`` file (atomically), then deletes
the files it replaces. A crash between the two leaves files the newest compact file already
holds: they are ignored (and deleted) when the shard loads, so a re-run loses nothing the
budget keeps and counts nothing twice.

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
import json
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
_COMPACT_FILE = re.compile(r"compact-t(\d+)-shard(\d+)\.npz$")
MEANS_FILES = 8  # class-sum files of a shard before they are folded into a compact file
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


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``n`` rows (class sums of a grown label space)."""
    return a if len(a) >= n else np.concatenate([a, np.zeros((n - len(a), *a.shape[1:]))])


def _fold_sums(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The per-class (sums, counts) of several keys added up; label spaces may have grown
    between keys, so each is zero-padded to the largest."""
    n = max(len(c) for _, c in parts)
    return sum(_pad_rows(s, n) for s, _ in parts), sum(_pad_rows(c, n) for _, c in parts)


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
        self.compacted = -1  # the last task folded into a compact file (-1: none)
        self.folded: set[str] = set()  # class-sum keys a compact file holds
        self.files: dict[str, list[str]] = {"rows": [], "means": []}  # files not compacted
        if path is not None:
            self._load(storage.location(path))

    def _load(self, folder) -> None:
        """The newest compact file, then the task and class-sum files it does not hold;
        files it holds (a compaction interrupted before its deletes) are deleted."""
        storage.makedirs(folder)
        names = [e.name for e in storage.listdir(folder) if not e.is_dir]
        mine = f"-shard{self.shard:02d}.npz"
        compact = sorted((int(_COMPACT_FILE.search(n).group(1)), n) for n in names
                         if n.startswith("compact-") and n.endswith(mine))  # fmt: skip
        stale = [n for _, n in compact[:-1]]
        if compact:
            t, name = compact[-1]
            z = _load_npz(folder / name)
            self.compacted = t
            self.tasks[t] = {k: z[k] for k in (*_KEYS, "classes_seen")}
            self.folded = set(json.loads(str(z["means_keys"])))
            for d in json.loads(str(z["means_dims"])):
                self.sums[f"compact-{d}"] = (z[f"sums_{d}"], z[f"counts_{d}"])
        for f in sorted(n for n in names if fnmatch.fnmatchcase(n, f"task*{mine}")):
            t = int(_TASK_FILE.search(f).group(1))
            if t <= self.compacted:
                stale.append(f)
                continue
            self.tasks[t] = _load_npz(folder / f)
            self.files["rows"].append(f)
        for f in sorted(n for n in names if fnmatch.fnmatchcase(n, f"means-*{mine}")):
            z = _load_npz(folder / f)
            if str(z["key"]) in self.folded:
                stale.append(f)
                continue
            self.sums[str(z["key"])] = (z["sums"], z["counts"])
            self.files["means"].append(f)
        for f in stale:
            storage.delete(folder / f)

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
        if task in self.tasks or task <= self.compacted:
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
            name = f"task{task:04d}-shard{self.shard:02d}.npz"
            _save_npz(storage.join(self.path, name), rows)
            self.files["rows"].append(name)
        self.tasks[task] = rows
        self.maybe_compact(task)
        return {**self.stats(), "added": len(keep), "changed": True}

    def maybe_compact(self, task: int) -> bool:
        """Compact (see the module docstring) when the stored rows reach twice the kept ones
        or the class-sum files exceed ``MEANS_FILES``; returns whether it did."""
        if self.path is None or not (self.files["rows"] or self.files["means"]):
            return False
        stored = sum(len(r["ids"]) for r in self.tasks.values())
        kept = self.content()
        if stored < 2 * max(len(kept["ids"]), 1) and len(self.files["means"]) <= MEANS_FILES:
            return False
        self.compact(task, kept)
        return True

    def compact(self, task: int, kept: dict[str, np.ndarray] | None = None) -> None:
        """Write what the budget keeps (``kept``: ``content()``, when the caller has it) and
        the folded class sums as ``compact-t<task>``, then delete the files it holds (a crash
        between the two loses nothing: ``_load``)."""
        kept = self.content() if kept is None else kept
        groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for s, c in self.sums.values():
            groups.setdefault(s.shape[1], []).append((s, c))
        by_dim = {d: _fold_sums(parts) for d, parts in groups.items()}
        seen = [int(r["classes_seen"]) for _, r in sorted(self.tasks.items())]
        arrays = {**kept, "classes_seen": np.int64(seen[-1] if seen else -1),
                  "means_keys": np.array(json.dumps(sorted(self.folded | {
                      k for k in self.sums if not k.startswith("compact-")}))),
                  "means_dims": np.array(json.dumps(sorted(by_dim)))}  # fmt: skip
        for d, (s, c) in by_dim.items():
            arrays[f"sums_{d}"], arrays[f"counts_{d}"] = s, c
        folder = storage.location(self.path)
        name = f"compact-t{task:04d}-shard{self.shard:02d}.npz"
        _save_npz(folder / name, arrays)
        old = self.files["rows"] + self.files["means"]
        if self.compacted >= 0:
            old.append(f"compact-t{self.compacted:04d}-shard{self.shard:02d}.npz")
        for f in old:
            storage.delete(folder / f)
        self.tasks = {task: {k: arrays[k] for k in (*_KEYS, "classes_seen")}}
        self.folded = set(json.loads(str(arrays["means_keys"])))
        self.sums = {f"compact-{d}": v for d, v in by_dim.items()}
        self.compacted, self.files = task, {"rows": [], "means": []}

    def update_class_sums(self, sums, counts, key: str) -> bool:
        """Fold per-class sums (C, D) and counts (C,) of embedded items (all-reduced over the
        Train ranks) into E_c, this shard's classes only. Idempotent by ``key``."""
        if key in self.sums or key in self.folded:
            return False
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        mine = self.owns(np.arange(len(counts)))
        sums, counts = np.where(mine[:, None], sums, 0.0), np.where(mine, counts, 0.0)
        if self.path is not None:
            name = f"means-{key}-shard{self.shard:02d}.npz"
            _save_npz(storage.join(self.path, name), {"key": np.array(key), "sums": sums,
                                                       "counts": counts})  # fmt: skip
            self.files["means"].append(name)
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
        sums, counts = _fold_sums(parts)
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

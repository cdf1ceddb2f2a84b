"""The episodic memory: a durable exemplar store, served to Train workers by a named Ray actor.

- ``MemoryStore``: plain Python (unit-testable without Ray). Holds exemplars (id, uint8 image
  (C, H, W), label, arrival task, optional old-model embedding) in per-class priority order,
  keeps the class-balanced budget as classes arrive, samples seeded class-balanced replay
  batches, and keeps CVS's running class means E_c. Every change is persisted atomically to
  ``<path>/memory.npz`` (one file, written to a temp name, fsync'd, then ``os.replace``: the
  rename is the commit point), and a new store on the same path reloads it, so an actor
  restart or a resumed run sees exactly what was committed.
- ``create_memory_service`` / ``get_memory_service`` / ``kill_memory_service``: the actor,
  named ``memory-<run_name>`` in an explicit namespace, restarted by Ray after a crash
  (``max_restarts``; ``__init__`` reloads from disk) with calls retried (``max_task_retries``;
  writes are idempotent by exemplar id). On a cluster ``path`` must be shared storage.
- ``ReplayPrefetcher``: used inside a Train worker; keeps ``depth`` sample calls in flight so
  a training step does not wait on the actor.

Usage (driver, then any worker of the same Ray job)::

    actor = create_memory_service("job", "runs/job/memory", total=2000)
    ray.get(actor.commit.remote(task, ids, images, labels, embeddings))
    prefetch = ReplayPrefetcher(get_memory_service("job"), batch_size=64, seed=seed + rank)
    batch = prefetch.next()  # dict(ids, images, labels, tasks, embeddings)

Test: ``.venv/bin/python -m pytest tests/test_memory_service.py -q``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray

from distcl.memory.selection import per_class_budget

FILENAME = "memory.npz"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class _State:
    """One immutable snapshot of the memory; rows sorted by class, then priority."""

    ids: tuple[str, ...] = ()
    images: np.ndarray | None = None  # (N, C, H, W) uint8; None until the first commit
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,)
    tasks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (N,)
    embeddings: np.ndarray | None = None  # (N, D) float32, zero rows where absent
    has_embedding: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,)
    classes_seen: tuple[int, ...] = ()
    ec_means: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (D,) float64
    ec_counts: dict[int, int] = field(default_factory=dict)
    ec_keys: tuple[str, ...] = ()  # update_class_means keys already applied (idempotency)


class MemoryStore:
    """Durable, class-balanced exemplar store (see the module docstring).

    ``path`` is a directory (``None``: in memory only). Give ``per_class`` (fixed budget per
    class) or ``total`` (``total // classes seen`` per class, so old classes shrink as classes
    arrive), or both (the smaller wins). A committed state at ``path`` is reloaded; the budget
    given here wins over the saved one from the next commit on.
    """

    def __init__(
        self,
        path: str | None,
        per_class: int | None = None,
        total: int | None = None,
        seed: int = 0,
    ) -> None:
        per_class_budget(0, per_class, total)  # validates the budget arguments
        self.path = None if path is None else os.fspath(path)
        self.per_class = per_class
        self.total = total
        self.seed = int(seed)
        self._state = _State()
        if self.path is not None:
            os.makedirs(self.path, exist_ok=True)
            file = os.path.join(self.path, FILENAME)
            if os.path.exists(file):
                self._state = _load(file)

    # ------------------------------------------------------------------ writes
    def commit(
        self,
        task: int,
        ids: list[str],
        images: np.ndarray,
        labels: np.ndarray,
        embeddings: np.ndarray | None = None,
        order: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Add exemplars of ``task`` (rows in priority order per class), rebalance, persist.

        ``order`` (optional): indices into the inputs giving the rows to add, in priority
        order (e.g. the concatenated output of ``select_exemplars``). Ids already stored (or
        repeated in the call) are ignored, so a retried or duplicated commit changes nothing
        and does not rewrite the file. New rows of a class go after its stored ones. Returns
        ``stats()`` plus ``added`` (ids newly stored) and ``changed``.
        """
        ids = [str(i) for i in ids]
        images = np.asarray(images)
        labels = np.asarray(labels)
        n = len(ids)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n:
            raise ValueError(
                f"images must be uint8 (N, C, H, W) with N={n}, got {images.dtype} {images.shape}"
            )
        old = self._state
        if old.images is not None and images.shape[1:] != old.images.shape[1:]:
            raise ValueError(
                f"images must have shape (C, H, W)={old.images.shape[1:]}, got {images.shape[1:]}"
            )
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}"
            )
        if embeddings is not None:
            embeddings = np.asarray(embeddings)
            if embeddings.ndim != 2 or embeddings.shape[0] != n:
                raise ValueError(f"embeddings must be (N, D) with N={n}, got {embeddings.shape}")
            if old.embeddings is not None and embeddings.shape[1] != old.embeddings.shape[1]:
                raise ValueError(
                    f"embeddings must have D={old.embeddings.shape[1]}, got {embeddings.shape[1]}"
                )
        if order is None:
            order = np.arange(n)
        order = np.asarray(order, dtype=np.int64)
        if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= n)):
            raise ValueError(f"order must be 1-D indices in [0, {n}), got {order}")

        stored = set(old.ids)
        keep = []  # input rows to add, first occurrence of each new id
        for i in order.tolist():
            if ids[i] not in stored:
                stored.add(ids[i])
                keep.append(i)
        new = _merge(old, task, ids, images, labels, embeddings, keep, self.per_class, self.total)
        changed = new.ids != old.ids or new.classes_seen != old.classes_seen
        if changed:
            self._persist(new)
            self._state = new
        added = len(set(new.ids) - set(old.ids))
        return {**self.stats(), "added": added, "changed": changed}

    def set_class_means(
        self, means: dict[int, np.ndarray], counts: dict[int, int] | None = None
    ) -> None:
        """Replace the running class means E_c (``counts`` default to 1 per class); persists."""
        counts = counts or {}
        ec_means = {int(c): np.array(v, dtype=np.float64).reshape(-1) for c, v in means.items()}
        ec_counts = {c: int(counts.get(c, 1)) for c in ec_means}
        self._update(replace(self._state, ec_means=ec_means, ec_counts=ec_counts))

    def update_class_means(
        self, labels: np.ndarray, embeddings: np.ndarray, key: str | None = None
    ) -> bool:
        """Fold embedded training items into the running class means E_c; persists.

        ``key`` (e.g. ``"task3/rank0"``) makes the call idempotent under retries: an update
        whose key was already applied is ignored. Returns whether anything changed.
        """
        labels = np.asarray(labels)
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if labels.ndim != 1 or embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError(
                f"labels (N,) and embeddings (N, D) must agree, got {labels.shape} and "
                f"{embeddings.shape}"
            )
        st = self._state
        if key is not None and key in st.ec_keys:
            return False
        means, counts = dict(st.ec_means), dict(st.ec_counts)
        for c in np.unique(labels):
            rows = embeddings[labels == c]  # (n_c, D)
            c, k = int(c), len(rows)
            prev, n0 = means.get(c), counts.get(c, 0)
            if prev is not None and prev.shape != rows.shape[1:]:
                raise ValueError(f"embeddings must have D={prev.shape[0]}, got {rows.shape[1]}")
            total = rows.sum(axis=0) + (prev * n0 if prev is not None else 0.0)
            means[c], counts[c] = total / (n0 + k), n0 + k
        keys = st.ec_keys + ((key,) if key is not None else ())
        self._update(replace(st, ec_means=means, ec_counts=counts, ec_keys=keys))
        return True

    # ------------------------------------------------------------------- reads
    def sample(self, n: int, seed: int) -> dict[str, Any]:
        """A class-balanced batch of ``n`` exemplars, the same for the same ``seed`` and content.

        Each stored class gets ``n // K`` rows, ``n % K`` random classes one more; rows are
        drawn without replacement within a class while it has enough, with replacement
        otherwise; the batch is shuffled. ``embeddings`` is None when no exemplar has one (NaN
        rows for exemplars without). Empty memory gives empty arrays.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        st = self._state
        rng = np.random.default_rng(int(seed))
        classes, starts, counts = np.unique(st.labels, return_index=True, return_counts=True)
        if len(st.ids) == 0 or n == 0:
            rows = np.zeros(0, np.int64)
        else:
            k = len(classes)
            quota = np.full(k, n // k)
            quota[rng.choice(k, n % k, replace=False)] += 1
            parts = [
                s + rng.choice(cnt, q, replace=bool(q > cnt))
                for s, cnt, q in zip(starts, counts, quota, strict=True)
            ]
            rows = rng.permutation(np.concatenate(parts))  # (n,) storage rows
        return self._rows(rows)

    def class_means(self) -> dict[int, np.ndarray]:
        """Mean (float32 (D,)) of the stored exemplars' embeddings, per class that has any."""
        st = self._state
        if st.embeddings is None:
            return {}
        out = {}
        for c in np.unique(st.labels[st.has_embedding]):
            rows = (st.labels == c) & st.has_embedding
            out[int(c)] = st.embeddings[rows].mean(axis=0).astype(np.float32)
        return out

    def running_class_means(self) -> dict[int, np.ndarray]:
        """CVS's E_c: running mean (float32 (D,)) of every embedded item per class."""
        return {c: v.astype(np.float32) for c, v in sorted(self._state.ec_means.items())}

    def running_class_counts(self) -> dict[int, int]:
        """How many embeddings each running class mean E_c averages."""
        return dict(sorted(self._state.ec_counts.items()))

    def ids(self) -> list[str]:
        """Stored exemplar ids, by class then priority."""
        return list(self._state.ids)

    def content(self) -> dict[str, Any]:
        """All stored exemplars (copies), by class then priority; same keys as ``sample``."""
        return self._rows(np.arange(len(self._state.ids)))

    def stats(self) -> dict[str, Any]:
        """Counts (total, per class, per arrival task), budget, shapes and bytes held."""
        st = self._state
        arrays = [st.labels, st.tasks, st.has_embedding]
        arrays += [a for a in (st.images, st.embeddings) if a is not None]
        cls, cls_n = np.unique(st.labels, return_counts=True)
        tsk, tsk_n = np.unique(st.tasks, return_counts=True)
        return {
            "n": len(st.ids),
            "per_class": {int(c): int(k) for c, k in zip(cls, cls_n, strict=True)},
            "tasks": {int(t): int(k) for t, k in zip(tsk, tsk_n, strict=True)},
            "classes_seen": len(st.classes_seen),
            "budget_per_class": per_class_budget(len(st.classes_seen), self.per_class, self.total),
            "image_shape": None if st.images is None else tuple(st.images.shape[1:]),
            "embedding_dim": None if st.embeddings is None else int(st.embeddings.shape[1]),
            "n_embedded": int(st.has_embedding.sum()),
            "bytes": int(sum(a.nbytes for a in arrays)),
        }

    def digest(self) -> str:
        """sha256 of the whole content in canonical order (class, priority), E_c included."""
        st = self._state
        h = hashlib.sha256()
        h.update("\0".join(st.ids).encode())
        for a in (st.labels, st.tasks, st.has_embedding, st.images, st.embeddings):
            h.update(b"|none" if a is None else f"|{a.dtype}{a.shape}".encode())
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps(list(st.classes_seen)).encode())
        for c in sorted(st.ec_means):
            h.update(f"{c}:{st.ec_counts[c]}".encode() + st.ec_means[c].tobytes())
        h.update("\0".join(st.ec_keys).encode())
        return h.hexdigest()

    def ping(self) -> bool:
        """Liveness check (for the driver waiting on a restarted actor)."""
        return True

    # ---------------------------------------------------------------- internals
    def _rows(self, rows: np.ndarray) -> dict[str, Any]:
        st = self._state
        shape = (0, 0, 0, 0) if st.images is None else st.images.shape
        images = st.images[rows] if st.images is not None else np.zeros(shape, np.uint8)
        emb = None
        if st.embeddings is not None:
            emb = st.embeddings[rows].copy()  # (n, D)
            emb[~st.has_embedding[rows]] = np.nan
        return {
            "ids": np.array([st.ids[i] for i in rows.tolist()], dtype=str),
            "images": images,
            "labels": st.labels[rows],
            "tasks": st.tasks[rows],
            "embeddings": emb,
        }

    def _update(self, new: _State) -> None:
        self._persist(new)
        self._state = new

    def _persist(self, st: _State) -> None:
        """Write ``st`` to ``<path>/memory.npz`` atomically (temp file, fsync, rename)."""
        if self.path is None:
            return
        meta = {
            "format": _FORMAT_VERSION,
            "per_class": self.per_class,
            "total": self.total,
            "seed": self.seed,
            "classes_seen": list(st.classes_seen),
            "ec_keys": list(st.ec_keys),
            "has_images": st.images is not None,
            "has_embeddings": st.embeddings is not None,
            "written_at": time.time(),
        }
        ec_classes = sorted(st.ec_means)
        dim = len(st.ec_means[ec_classes[0]]) if ec_classes else 0
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "ids": np.array(st.ids, dtype=str) if st.ids else np.zeros(0, dtype="<U1"),
            "images": st.images if st.images is not None else np.zeros((0, 0, 0, 0), np.uint8),
            "labels": st.labels,
            "tasks": st.tasks,
            "embeddings": (
                st.embeddings if st.embeddings is not None else np.zeros((0, 0), np.float32)
            ),
            "has_embedding": st.has_embedding,
            "ec_classes": np.array(ec_classes, dtype=np.int64),
            "ec_means": np.array([st.ec_means[c] for c in ec_classes], np.float64).reshape(
                len(ec_classes), dim
            ),
            "ec_counts": np.array([st.ec_counts[c] for c in ec_classes], dtype=np.int64),
        }
        fd, tmp = tempfile.mkstemp(prefix=".memory-", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                _write_arrays(f, arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.path, FILENAME))  # the commit point
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path)


def _write_arrays(f: io.BufferedWriter, arrays: dict[str, np.ndarray]) -> None:
    """Serialise arrays into an open file (a seam for the interrupted-write test)."""
    np.savez(f, **arrays)


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load(file: str) -> _State:
    with np.load(file, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != _FORMAT_VERSION:
            raise ValueError(f"{file}: unknown memory format {meta.get('format')!r}")
        ec_classes = z["ec_classes"].tolist()
        ec_means = z["ec_means"]
        ec_counts = z["ec_counts"].tolist()
        return _State(
            ids=tuple(str(i) for i in z["ids"].tolist()),
            images=z["images"] if meta["has_images"] else None,
            labels=z["labels"].astype(np.int64),
            tasks=z["tasks"].astype(np.int32),
            embeddings=z["embeddings"] if meta["has_embeddings"] else None,
            has_embedding=z["has_embedding"].astype(bool),
            classes_seen=tuple(int(c) for c in meta["classes_seen"]),
            ec_means={int(c): ec_means[i].astype(np.float64) for i, c in enumerate(ec_classes)},
            ec_counts={int(c): int(k) for c, k in zip(ec_classes, ec_counts, strict=True)},
            ec_keys=tuple(meta["ec_keys"]),
        )


def _merge(
    old: _State,
    task: int,
    ids: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray | None,
    keep: list[int],
    per_class: int | None,
    total: int | None,
) -> _State:
    """Old rows + new rows ``keep``, grouped by class (old first), cut to the budget."""
    keep_idx = np.asarray(keep, dtype=np.int64)
    new_labels = labels[keep_idx].astype(np.int64)
    all_labels = np.concatenate([old.labels, new_labels])  # (N_old + N_new,)
    all_ids = list(old.ids) + [ids[i] for i in keep]
    all_tasks = np.concatenate([old.tasks, np.full(len(keep), task, np.int32)])
    base = old.images if old.images is not None else np.zeros((0, *images.shape[1:]), np.uint8)
    # np.array copies: Ray hands actors read-only views into the object store.
    all_images = np.concatenate([base, np.array(images[keep_idx], dtype=np.uint8)])
    dim = None
    if old.embeddings is not None:
        dim = old.embeddings.shape[1]
    elif embeddings is not None:
        dim = embeddings.shape[1]
    all_emb, all_has = None, np.concatenate([old.has_embedding, np.zeros(len(keep), bool)])
    if dim is not None:
        old_emb = old.embeddings if old.embeddings is not None else np.zeros((len(old.ids), dim))
        new_emb = np.zeros((len(keep), dim), np.float32)
        if embeddings is not None:
            new_emb = np.array(embeddings[keep_idx], dtype=np.float32)
            all_has[len(old.ids) :] = True
        all_emb = np.concatenate([old_emb.astype(np.float32), new_emb])  # (N, D)

    classes_seen = tuple(sorted(set(old.classes_seen) | {int(c) for c in new_labels}))
    m = per_class_budget(len(classes_seen), per_class, total)
    rows = []  # storage rows: by class, stored rows first (stable sort), first m of each
    for c in np.unique(all_labels):
        rows.extend(np.flatnonzero(all_labels == c)[:m].tolist())
    rows = np.asarray(rows, dtype=np.int64)
    return replace(
        old,
        ids=tuple(all_ids[i] for i in rows.tolist()),
        images=all_images[rows] if len(all_ids) or old.images is not None else None,
        labels=all_labels[rows],
        tasks=all_tasks[rows],
        embeddings=None if all_emb is None else all_emb[rows],
        has_embedding=all_has[rows],
        classes_seen=classes_seen,
    )


# --------------------------------------------------------------------- the Ray actor
MemoryService = ray.remote(MemoryStore)


def actor_name(run_name: str) -> str:
    """The Ray actor name of a run's memory service."""
    return f"memory-{run_name}"


def create_memory_service(
    run_name: str,
    path: str,
    per_class: int | None = None,
    total: int | None = None,
    seed: int = 0,
    namespace: str = "distcl",
    max_restarts: int = -1,
    max_task_retries: int = -1,
    detached: bool = False,
) -> ray.actor.ActorHandle:
    """Create (or get, if it exists) the run's named memory actor in ``namespace``.

    Restarts re-run ``MemoryStore.__init__``, which reloads ``path``; pending and later calls
    are retried (commits are idempotent by id). Not detached by default: the actor lives as
    long as the driver's job. A detached one outlives it: kill it with ``kill_memory_service``.
    """
    per_class_budget(0, per_class, total)  # fail in the caller, not in the actor
    return MemoryService.options(
        name=actor_name(run_name),
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached" if detached else None,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
        num_cpus=0,  # a light service: it must not take a Train worker's CPU
    ).remote(os.path.abspath(path), per_class, total, seed)


def get_memory_service(run_name: str, namespace: str = "distcl") -> ray.actor.ActorHandle:
    """The run's memory actor, from any process of the Ray cluster (ValueError if absent)."""
    return ray.get_actor(actor_name(run_name), namespace=namespace)


def kill_memory_service(run_name: str, namespace: str = "distcl") -> bool:
    """Kill the run's memory actor for good (no restart); False if there was none."""
    try:
        actor = get_memory_service(run_name, namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


def replay_seed(seed: int, counter: int) -> int:
    """The seed of the ``counter``-th replay batch of a stream seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(counter)]).generate_state(1)[0])


class ReplayPrefetcher:
    """Keeps ``depth`` replay-batch requests in flight so a step rarely waits on the actor.

    Batch ``i`` is ``actor.sample(batch_size, replay_seed(seed, i))``: a run is reproducible
    given the memory content (pass ``seed + rank`` per worker). Batches requested before a
    commit reflect the old content: make a new prefetcher after each task's commit.
    ``wait_s`` accumulates the time ``next`` spent blocked on the actor.
    """

    def __init__(
        self, actor: ray.actor.ActorHandle, batch_size: int, seed: int, depth: int = 2
    ) -> None:
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.actor = actor
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.depth = int(depth)
        self.wait_s = 0.0
        self._counter = 0
        self._inflight: deque = deque()
        for _ in range(self.depth):
            self._issue()

    def _issue(self) -> None:
        seed = replay_seed(self.seed, self._counter)
        self._counter += 1
        self._inflight.append(self.actor.sample.remote(self.batch_size, seed))

    def next(self) -> dict[str, Any]:
        """The next batch (writable copies): ids, images, labels, tasks, embeddings."""
        if not self._inflight:
            raise RuntimeError("ReplayPrefetcher is closed")
        ref = self._inflight.popleft()
        self._issue()  # before blocking, so the actor works while we wait and train
        t0 = time.perf_counter()
        batch = ray.get(ref)
        self.wait_s += time.perf_counter() - t0
        return {k: None if v is None else np.array(v, copy=True) for k, v in batch.items()}

    __next__ = next

    def __iter__(self) -> ReplayPrefetcher:
        return self

    def close(self, wait: bool = False) -> None:
        """Drop the requests in flight; ``wait``: first let them finish (e.g. before a kill)."""
        if wait and self._inflight:
            ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=60)
        self._inflight.clear()

    def __enter__(self) -> ReplayPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

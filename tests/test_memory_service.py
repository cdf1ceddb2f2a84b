"""Tests of the episodic memory store and its Ray actor service (distcl.memory.service).

The ``MemoryStore`` tests need no Ray; those marked ``ray`` share one local Ray runtime
(module fixture). Run: ``.venv/bin/python -m pytest tests/test_memory_service.py -q``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray

from distcl.memory import service
from distcl.memory.service import (
    MemoryStore,
    ReplayPrefetcher,
    create_memory_service,
    get_memory_service,
    kill_memory_service,
)

SHAPE = (1, 4, 4)


def make_batch(task: int, classes: list[int], n: int, dim: int | None = 3) -> dict:
    """``n`` items per class, in priority order; the image and embedding derive from the id."""
    ids, labels = [], []
    for c in classes:
        for i in range(n):
            ids.append(f"c{c}-i{i}")
            labels.append(c)
    labels = np.array(labels, dtype=np.int64)
    images = np.stack([_image(i) for i in ids])  # (N, 1, 4, 4) uint8
    emb = None
    if dim is not None:
        emb = np.stack([_embedding(i, dim) for i in ids]).astype(np.float32)  # (N, D)
    return {"task": task, "ids": ids, "images": images, "labels": labels, "embeddings": emb}


def _image(item_id: str) -> np.ndarray:
    return np.full(SHAPE, sum(map(ord, item_id)) % 251, dtype=np.uint8)


def _embedding(item_id: str, dim: int) -> np.ndarray:
    c, i = (int(p[1:]) for p in item_id.split("-"))
    return np.array([c, i] + [1.0] * (dim - 2), dtype=np.float32)


# ----------------------------------------------------------------------- MemoryStore


def test_total_budget_stays_class_balanced_as_classes_arrive(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), total=20)
    out = store.commit(**make_batch(0, [0, 1], 15))
    assert out["per_class"] == {0: 10, 1: 10} and out["added"] == 20
    assert out["budget_per_class"] == 10
    out = store.commit(**make_batch(1, [2, 3], 15))
    assert out["per_class"] == {0: 5, 1: 5, 2: 5, 3: 5} and out["n"] == 20
    assert out["tasks"] == {0: 10, 1: 10}
    # Old classes keep their first-priority exemplars.
    expected = [f"c{c}-i{i}" for c in range(4) for i in range(5)]
    assert store.ids() == expected


def test_per_class_budget_and_order(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), per_class=2)
    b = make_batch(0, [5], 4)
    store.commit(**b, order=np.array([3, 1, 0]))  # caller's priority: i3, i1, i0
    assert store.ids() == ["c5-i3", "c5-i1"]
    # A later task's new rows of a stored class go after the stored ones (then the cut).
    store.commit(**make_batch(1, [5, 6], 3))
    assert store.ids() == ["c5-i3", "c5-i1", "c6-i0", "c6-i1"]


def test_commit_is_idempotent_and_does_not_rewrite(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), per_class=3)
    b = make_batch(0, [0, 1], 4)
    first = store.commit(**b)
    file = tmp_path / service.FILENAME
    before = os.stat(file)
    digest = store.digest()
    again = store.commit(**b)
    assert first["changed"] and not again["changed"] and again["added"] == 0
    assert store.digest() == digest
    after = os.stat(file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Repeated ids inside one call are stored once (the first occurrence).
    store2 = MemoryStore(None, per_class=10)
    dup = make_batch(0, [0], 2)
    dup = {k: v if k == "task" else v[[0, 1, 0, 1]] for k, v in dup.items() if k != "ids"}
    store2.commit(ids=["a", "b", "a", "b"], **dup)
    assert store2.ids() == ["a", "b"]


def test_commit_copies_its_inputs(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), per_class=4)
    b = make_batch(0, [0], 4)
    store.commit(**b)
    digest = store.digest()
    b["images"][:] = 0
    b["embeddings"][:] = 0
    assert store.digest() == digest
    ro = make_batch(1, [1], 2)
    ro["images"].setflags(write=False)  # as Ray hands them to an actor
    store.commit(**ro)
    assert store.content()["images"].flags.writeable


def test_commit_bad_input(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), per_class=4)
    b = make_batch(0, [0], 2)
    with pytest.raises(ValueError, match="images"):
        store.commit(**{**b, "images": b["images"].astype(np.float32)})
    with pytest.raises(ValueError, match="labels"):
        store.commit(**{**b, "labels": b["labels"][:1]})
    store.commit(**b)
    with pytest.raises(ValueError, match="embeddings"):
        store.commit(**make_batch(1, [1], 2, dim=5))
    with pytest.raises(ValueError, match="images"):
        store.commit(**{**make_batch(1, [1], 2), "images": np.zeros((2, 3, 4, 4), np.uint8)})
    with pytest.raises(ValueError, match="per_class or total"):
        MemoryStore(None)


def test_sample_is_class_balanced_and_seeded() -> None:
    store = MemoryStore(None, per_class=10)
    store.commit(**make_batch(0, [0, 1, 2, 3], 6))
    batch = store.sample(8, seed=1)
    assert np.bincount(batch["labels"], minlength=4).tolist() == [2, 2, 2, 2]
    assert len(set(batch["ids"].tolist())) == 8  # without replacement within a class
    odd = store.sample(9, seed=1)
    assert sorted(np.bincount(odd["labels"], minlength=4).tolist()) == [2, 2, 2, 3]
    for key in ("ids", "labels", "tasks", "images", "embeddings"):
        np.testing.assert_array_equal(batch[key], store.sample(8, seed=1)[key])
    assert batch["ids"].tolist() != store.sample(8, seed=2)["ids"].tolist()
    # Rows stay aligned: images and embeddings are those of the sampled ids.
    for i, item_id in enumerate(batch["ids"]):
        np.testing.assert_array_equal(batch["images"][i], _image(item_id))
        np.testing.assert_array_equal(batch["embeddings"][i], _embedding(item_id, 3))
    assert batch["images"].shape == (8, *SHAPE) and batch["images"].dtype == np.uint8
    big = store.sample(100, seed=0)  # more than stored: with replacement, still balanced
    assert np.bincount(big["labels"]).tolist() == [25, 25, 25, 25]
    empty = MemoryStore(None, total=5).sample(4, seed=0)
    assert empty["ids"].shape == (0,) and empty["images"].shape[0] == 0
    assert empty["embeddings"] is None


def test_class_means_and_missing_embeddings() -> None:
    store = MemoryStore(None, per_class=10)
    store.commit(**make_batch(0, [0, 1], 3))  # embeddings (c, i, 1)
    store.commit(**make_batch(1, [2], 2, dim=None))  # no embeddings
    means = store.class_means()
    assert sorted(means) == [0, 1]
    np.testing.assert_allclose(means[0], [0, 1, 1])  # i in {0, 1, 2}
    np.testing.assert_allclose(means[1], [1, 1, 1])
    rows = store.content()
    assert np.isnan(rows["embeddings"][rows["labels"] == 2]).all()
    assert store.stats()["n_embedded"] == 6


def test_running_class_means_are_idempotent_and_persisted(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), per_class=2)
    assert store.update_class_means(np.array([0, 0, 1]), np.array([[1.0, 0], [3, 2], [5, 5]]), "t0")
    assert not store.update_class_means(np.array([0]), np.array([[100.0, 0]]), "t0")  # retried
    store.update_class_means(np.array([0]), np.array([[5.0, 4]]), "t1")
    np.testing.assert_allclose(store.running_class_means()[0], [3, 2])  # (1+3+5)/3, (0+2+4)/3
    np.testing.assert_allclose(store.running_class_means()[1], [5, 5])
    assert store.running_class_counts() == {0: 3, 1: 1}
    resumed = MemoryStore(str(tmp_path), per_class=2)
    assert resumed.digest() == store.digest()
    np.testing.assert_allclose(resumed.running_class_means()[0], [3, 2])
    store.set_class_means({4: np.array([1.0, 1.0])}, {4: 7})
    assert MemoryStore(str(tmp_path), per_class=2).running_class_counts() == {4: 7}


def test_resumed_store_has_the_same_content(tmp_path) -> None:
    store = MemoryStore(str(tmp_path), total=12)
    store.commit(**make_batch(0, [0, 1], 8))
    store.commit(**make_batch(1, [2], 8, dim=None))
    resumed = MemoryStore(str(tmp_path), total=12)
    assert resumed.digest() == store.digest() and resumed.ids() == store.ids()
    assert resumed.stats() == store.stats()
    for key in ("ids", "images", "labels", "tasks"):
        np.testing.assert_array_equal(resumed.sample(7, 3)[key], store.sample(7, 3)[key])


def test_interrupted_write_keeps_the_previous_commit(tmp_path, monkeypatch) -> None:
    store = MemoryStore(str(tmp_path), per_class=5)
    store.commit(**make_batch(0, [0], 3))
    digest = store.digest()

    def crash(f, arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(service, "_write_arrays", crash)
    with pytest.raises(OSError, match="disk full"):
        store.commit(**make_batch(1, [1], 3))
    assert store.digest() == digest  # the failed commit left memory unchanged too
    assert sorted(os.listdir(tmp_path)) == [service.FILENAME]  # no temp file left
    monkeypatch.undo()
    assert MemoryStore(str(tmp_path), per_class=5).digest() == digest
    store.commit(**make_batch(1, [1], 3))  # a retry then succeeds
    assert MemoryStore(str(tmp_path), per_class=5).stats()["per_class"] == {0: 3, 1: 3}


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def _commit_from_worker(run_name: str, batch: dict) -> dict:
    return ray.get(get_memory_service(run_name).commit.remote(**batch))


@pytest.mark.ray
def test_concurrent_commits_of_the_same_ids_store_them_once(ray_local, tmp_path) -> None:
    actor = create_memory_service("concurrent", str(tmp_path), per_class=10)
    batch = make_batch(0, [0, 1, 2], 6)
    outs = ray.get([_commit_from_worker.remote("concurrent", batch) for _ in range(2)])
    assert sorted(o["added"] for o in outs) == [0, 18]
    local = MemoryStore(None, per_class=10)
    local.commit(**batch)
    assert ray.get(actor.digest.remote()) == local.digest()
    assert ray.get(actor.stats.remote())["n"] == 18
    kill_memory_service("concurrent")


@pytest.mark.ray
def test_killed_actor_restarts_with_identical_content(ray_local, tmp_path) -> None:
    actor = create_memory_service("restart", str(tmp_path), total=12)
    ray.get(actor.commit.remote(**make_batch(0, [0, 1], 8)))
    ray.get(actor.update_class_means.remote(np.array([0]), np.ones((1, 3)), "t0"))
    digest = ray.get(actor.digest.remote())
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(actor, no_restart=False)
    assert ray.get(actor.digest.remote(), timeout=60) == digest
    assert ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) != pid  # new process
    # The same handle by name, and a resumed run reading the directory, agree.
    assert ray.get(get_memory_service("restart").digest.remote()) == digest
    assert create_memory_service("restart", str(tmp_path), total=12) == actor  # get_if_exists
    assert MemoryStore(str(tmp_path), total=12).digest() == digest
    assert kill_memory_service("restart")
    with pytest.raises(ValueError):
        get_memory_service("restart")
    assert not kill_memory_service("restart")


@pytest.mark.ray
def test_replay_prefetcher_batches(ray_local, tmp_path) -> None:
    actor = create_memory_service("prefetch", str(tmp_path), per_class=5)
    ray.get(actor.commit.remote(**make_batch(0, [0, 1, 2, 3], 5)))
    first = ReplayPrefetcher(actor, batch_size=8, seed=3, depth=2)
    batches = [first.next() for _ in range(3)]
    for b in batches:
        assert b["images"].shape == (8, *SHAPE) and b["images"].flags.writeable
        assert b["labels"].shape == (8,) and b["embeddings"].shape == (8, 3)
        assert np.bincount(b["labels"], minlength=4).tolist() == [2, 2, 2, 2]
    assert batches[0]["ids"].tolist() != batches[1]["ids"].tolist()
    with ReplayPrefetcher(actor, batch_size=8, seed=3, depth=1) as second:
        for b in batches:  # same seed, same stream, whatever the depth
            np.testing.assert_array_equal(second.next()["ids"], b["ids"])
    first.close()
    with pytest.raises(RuntimeError, match="closed"):
        first.next()
    kill_memory_service("prefetch")

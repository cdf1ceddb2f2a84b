"""Tests of the episodic memory service (distcl.memory.service): one shard as plain Python,
then several shards as Ray actors (on the session's shared local Ray, conftest.py).

Run: ``.venv/bin/python -m pytest tests/test_memory_service.py -q``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray

from distcl.memory.service import (
    MEANS_FILES,
    MemoryFileError,
    MemoryShard,
    create_memory_service,
    kill_memory_service,
)

SHAPE = (1, 4, 4)


def make_batch(task: int, classes: list[int], n: int, dim: int = 3) -> dict:
    """``n`` items per class, in priority order; the image and embedding derive from the id."""
    ids = [f"c{c}-i{i}" for c in classes for i in range(n)]
    labels = np.repeat(np.array(classes, np.int64), n)
    images = np.stack([_image(i) for i in ids])  # (N, 1, 4, 4) uint8
    emb = np.stack([_embedding(i, dim) for i in ids]).astype(np.float32)  # (N, D)
    return {"task": task, "ids": ids, "images": images, "labels": labels, "embeddings": emb}


def _image(item_id: str) -> np.ndarray:
    return np.full(SHAPE, sum(map(ord, item_id)) % 251, dtype=np.uint8)


def _embedding(item_id: str, dim: int) -> np.ndarray:
    c, i = (int(p[1:]) for p in item_id.split("-"))
    return np.array([c, i] + [1.0] * (dim - 2), dtype=np.float32)


def ids(shard: MemoryShard) -> list[str]:
    return shard.content()["ids"].tolist()


# ----------------------------------------------------------------------- one shard


def test_total_budget_stays_class_balanced_as_classes_arrive(tmp_path) -> None:
    store = MemoryShard(str(tmp_path), total=20)
    out = store.commit(**make_batch(0, [0, 1], 15), classes_seen=2)
    assert out["per_class"] == {0: 10, 1: 10} and out["added"] == 30
    out = store.commit(**make_batch(1, [2, 3], 15), classes_seen=4)
    assert out["per_class"] == {0: 5, 1: 5, 2: 5, 3: 5} and out["n"] == 20
    # Old classes keep their first-priority exemplars. 60 rows stored for 20 kept: the shard
    # compacted its files into one holding the 20 (the disk bounded by the budget).
    assert ids(store) == [f"c{c}-i{i}" for c in range(4) for i in range(5)]
    assert sorted(os.listdir(tmp_path)) == ["compact-t0001-shard00.npz"]
    assert ids(MemoryShard(str(tmp_path), total=20)) == ids(store)


def test_a_later_tasks_rows_of_a_class_go_after_the_stored_ones(tmp_path) -> None:
    store = MemoryShard(str(tmp_path), per_class=3)
    store.commit(**make_batch(0, [5], 2))
    b = make_batch(1, [5, 6], 2)
    b["ids"] = [f"{i}-t1" for i in b["ids"]]
    store.commit(**b)
    assert ids(store) == ["c5-i0", "c5-i1", "c5-i0-t1", "c6-i0-t1", "c6-i1-t1"]


def test_commit_is_once_per_task_and_files_are_not_rewritten(tmp_path) -> None:
    store = MemoryShard(str(tmp_path), per_class=3)
    b = make_batch(0, [0, 1], 4)
    first = store.commit(**b)
    file = tmp_path / "task0000-shard00.npz"
    before = os.stat(file)
    digest = store.digest()
    again = store.commit(**b)  # a retried call
    assert first["changed"] and not again["changed"] and again["added"] == 0
    assert store.digest() == digest
    after = os.stat(file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Ids stored by an earlier task are skipped; repeated ids in one call are stored once.
    wide = MemoryShard(None, per_class=10)
    wide.commit(**b)
    dup = make_batch(1, [0], 2)
    dup = {k: v if k == "task" else v[[0, 1, 0, 1]] for k, v in dup.items() if k != "ids"}
    wide.commit(ids=["c0-i0", "new", "c0-i0", "new"], **dup)
    assert ids(wide)[:5] == ["c0-i0", "c0-i1", "c0-i2", "c0-i3", "new"]
    assert len(ids(wide)) == 9


def test_commit_bad_input(tmp_path) -> None:
    store = MemoryShard(str(tmp_path), per_class=4)
    b = make_batch(0, [0], 2)
    with pytest.raises(ValueError, match="images"):
        store.commit(**{**b, "images": b["images"].astype(np.float32)})
    with pytest.raises(ValueError, match="labels"):
        store.commit(**{**b, "labels": b["labels"][:1]})
    with pytest.raises(ValueError, match="embeddings"):
        store.commit(**{**b, "embeddings": b["embeddings"][:1]})
    with pytest.raises(ValueError, match="per_class or total"):
        MemoryShard(None)
    with pytest.raises(ValueError, match="shard"):
        MemoryShard(None, shard=2, shards=2, per_class=1)


def test_sample_is_class_balanced_seeded_and_aligned() -> None:
    store = MemoryShard(None, per_class=10)
    store.commit(**make_batch(0, [0, 1, 2, 3], 6))
    batch = store.sample(8, seed=1)
    assert np.bincount(batch["labels"], minlength=4).tolist() == [2, 2, 2, 2]
    assert len(set(batch["ids"].tolist())) == 8  # without replacement within a class
    for key in ("ids", "labels", "tasks", "images", "embeddings"):
        np.testing.assert_array_equal(batch[key], store.sample(8, seed=1)[key])
    for i, item_id in enumerate(batch["ids"]):  # rows stay aligned
        np.testing.assert_array_equal(batch["images"][i], _image(item_id))
        np.testing.assert_array_equal(batch["embeddings"][i], _embedding(item_id, 3))
    assert len(MemoryShard(None, total=5).sample(4, seed=0)["ids"]) == 0


def test_running_class_means_are_idempotent_and_persisted(tmp_path) -> None:
    store = MemoryShard(str(tmp_path), per_class=2)
    assert store.update_class_means(np.array([0, 0, 1]), np.array([[1.0, 0], [3, 2], [5, 5]]), "t0")
    assert not store.update_class_means(np.array([0]), np.array([[100.0, 0]]), "t0")  # retried
    sums, counts = np.array([[5.0, 4.0], [0, 0]]), np.array([1, 0])  # all-reduced form
    store.update_class_sums(sums, counts, "t1")
    np.testing.assert_allclose(store.running_class_means()[0], [3, 2])  # (1+3+5)/3, (0+2+4)/3
    np.testing.assert_allclose(store.running_class_means()[1], [5, 5])
    resumed = MemoryShard(str(tmp_path), per_class=2)
    assert resumed.digest() == store.digest()


def test_resumed_shard_has_the_same_content_and_a_damaged_file_is_named(tmp_path) -> None:
    store = MemoryShard(str(tmp_path), total=24)  # 24 rows stored, 24 kept: no compaction
    store.commit(**make_batch(0, [0, 1], 8), classes_seen=2)
    store.commit(**make_batch(1, [2], 8), classes_seen=3)
    resumed = MemoryShard(str(tmp_path), total=24)
    assert resumed.digest() == store.digest() and ids(resumed) == ids(store)
    assert resumed.stats() == store.stats()
    bad = tmp_path / "task0001-shard00.npz"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated by a crash of the disk, say
    with pytest.raises(MemoryFileError, match="task0001-shard00.npz"):
        MemoryShard(str(tmp_path), total=24)


def test_interrupted_commit_keeps_the_previous_state(tmp_path, monkeypatch) -> None:
    from distcl import rundir

    store = MemoryShard(str(tmp_path), per_class=5)
    store.commit(**make_batch(0, [0], 3))
    digest = store.digest()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.commit(**make_batch(1, [1], 3))
    monkeypatch.undo()
    assert store.digest() == digest  # the failed commit left the shard unchanged
    assert MemoryShard(str(tmp_path), per_class=5).digest() == digest
    store.commit(**make_batch(1, [1], 3))  # a retry then succeeds
    assert MemoryShard(str(tmp_path), per_class=5).stats()["per_class"] == {0: 3, 1: 3}


def _long_sequence(shard: MemoryShard, tasks: int, start: int = 0) -> None:
    """``tasks`` tasks of a long general sequence: 6 classes, each task 2 recurring classes
    with 4 new items each, a class-sum key per task."""
    for t in range(start, tasks):
        classes = [t % 6, (t + 3) % 6]
        batch = make_batch(t, classes, 4)
        batch["ids"] = [f"{i}-t{t}" for i in batch["ids"]]  # new items at every recurrence
        shard.commit(**batch, classes_seen=min(6, 2 + 2 * t))
        shard.update_class_means(batch["labels"], batch["embeddings"], key=f"task{t}")


def test_compaction_bounds_the_disk_and_keeps_what_the_budget_keeps(tmp_path) -> None:
    """50 tasks: the files stay few (a compact file, a few task and class-sum files), the
    content and the class means equal a shard that keeps everything in memory, and a
    restarted shard reads the same from disk."""
    disk, ref = MemoryShard(str(tmp_path), total=12), MemoryShard(None, total=12)
    _long_sequence(disk, 50)
    _long_sequence(ref, 50)
    assert disk.digest() == ref.digest() and ids(disk) == ids(ref)
    names = sorted(os.listdir(tmp_path))
    assert len(names) <= 2 + 2 + MEANS_FILES, names  # not one file per task
    assert sum(n.startswith("compact-") for n in names) == 1
    stored = sum(len(r["ids"]) for r in disk.tasks.values())
    assert stored < 2 * len(ids(disk)) + 8  # disk rows bounded by the budget, not by T
    assert MemoryShard(str(tmp_path), total=12).digest() == ref.digest()


@pytest.mark.parametrize("crash_at", ["compact write", "first delete"])
def test_a_compaction_killed_mid_way_and_rerun_loses_no_kept_exemplar(
    tmp_path, monkeypatch, crash_at
) -> None:
    """A crash while compacting (before its file is written, or after it and before the
    replaced files are deleted): a restarted shard has the content of one that never
    crashed, the task is not committed twice, and files the compact file holds go."""
    import distcl.memory.service as svc

    _long_sequence(MemoryShard(str(tmp_path), total=12), 20)
    ref = MemoryShard(None, total=12)
    _long_sequence(ref, 21)
    shard = MemoryShard(str(tmp_path), total=12)
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise OSError("killed")

    if crash_at == "compact write":
        real = svc._save_npz
        monkeypatch.setattr(svc, "_save_npz", lambda p, a: boom() if "compact-" in str(p)
                            else real(p, a))  # fmt: skip
    else:
        monkeypatch.setattr(svc.storage, "delete", boom)
    monkeypatch.setattr(svc, "MEANS_FILES", 0)  # this task compacts
    with pytest.raises(OSError, match="killed"):
        _long_sequence(shard, 21, start=20)
    monkeypatch.undo()
    again = MemoryShard(str(tmp_path), total=12)
    _long_sequence(again, 21, start=20)  # the re-run of task 20: idempotent
    assert again.digest() == ref.digest()
    names = os.listdir(tmp_path)
    assert sum(n.startswith("compact-") for n in names) <= 1
    if crash_at == "first delete":  # the files the compact file holds were removed at load
        assert not any(n.startswith("task0019") for n in names)


def test_shards_own_disjoint_classes(tmp_path) -> None:
    shards = [MemoryShard(str(tmp_path), s, 2, per_class=2) for s in range(2)]
    b = make_batch(0, [0, 1, 2, 3], 3)
    for s in shards:
        s.commit(**b)
    assert [sorted(s.stats()["per_class"]) for s in shards] == [[0, 2], [1, 3]]
    sums = np.arange(8.0).reshape(4, 2)
    for s in shards:
        s.update_class_sums(sums, np.ones(4), "t0")
    assert [sorted(s.running_class_means()) for s in shards] == [[0, 2], [1, 3]]


# --------------------------------------------------------------------------- on Ray


@pytest.mark.ray
def test_sharded_service_selects_commits_and_snapshots_like_one_shard(shared_ray, tmp_path):
    svc = create_memory_service("sharded", str(tmp_path / "three"), per_class=2, shards=3)
    one = MemoryShard(None, per_class=2)
    b = make_batch(0, [0, 1, 2, 3, 4], 4)
    rows = svc.select(b["labels"], b["embeddings"], 2, "herding", seed=0)
    expected = one.select(b["labels"], b["embeddings"], 2, "herding", seed=0)
    assert sorted(rows.tolist()) == sorted(expected.tolist())  # each class chosen by its owner
    svc.commit(0, np.array(b["ids"])[rows], b["images"][rows], b["labels"][rows],
               b["embeddings"][rows], classes_seen=5)  # fmt: skip
    one.commit(0, np.array(b["ids"])[expected], b["images"][expected], b["labels"][expected],
               b["embeddings"][expected], classes_seen=5)  # fmt: skip
    snap = svc.snapshot()
    for key, value in one.content().items():
        np.testing.assert_array_equal(snap[key], value)
    assert len(os.listdir(tmp_path / "three")) == 3  # one file per task and shard
    svc.update_class_sums(np.ones((5, 3)), np.ones(5), "t0")
    assert sorted(svc.running_class_means()) == [0, 1, 2, 3, 4]
    kill_memory_service(svc)


@pytest.mark.ray
def test_service_created_inside_a_tune_trials_placement_group(shared_ray, tmp_path):
    """A tuning trial runs in a placement group that captures its children (a 0.1-CPU
    bundle here, as Tune gives it); the memory shards ask for memory and must be placed
    outside it, not fail (the reference Pareto search's CL2R trials all failed so)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 0.1}])
    ray.get(pg.ready())

    @ray.remote(num_cpus=0.1)
    def trial(path: str, b: dict) -> int:
        from distcl.memory.service import create_memory_service, kill_memory_service

        svc = create_memory_service("in-trial", path, per_class=2, shards=2)
        svc.commit(0, b["ids"], b["images"], b["labels"], b["embeddings"], classes_seen=2)
        n = len(svc.snapshot()["labels"])
        kill_memory_service(svc)
        return n

    inside = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    b = make_batch(0, [0, 1], 4)
    try:
        assert ray.get(trial.options(scheduling_strategy=inside).remote(str(tmp_path), b)) == 4
    finally:
        remove_placement_group(pg)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.ray
def test_killed_actor_restarts_with_identical_content(shared_ray, tmp_path) -> None:
    svc = create_memory_service("restart", str(tmp_path), total=12, shards=2)
    b = make_batch(0, [0, 1], 8)
    svc.commit(0, b["ids"], b["images"], b["labels"], b["embeddings"], classes_seen=2)
    before = svc.snapshot()
    actor = svc.actors[1]
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(actor, no_restart=False)
    # ray.kill is asynchronous: wait until the old process is gone, so that the snapshot
    # below is served by the restarted actor (not, now and then, by the one being killed).
    deadline = time.monotonic() + 60
    while _running(pid):
        assert time.monotonic() < deadline, f"actor process {pid} still runs after ray.kill"
        time.sleep(0.05)
    after = svc.snapshot()  # retried until the restarted actor has reloaded its files
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) != pid  # new process
    again = create_memory_service("restart", str(tmp_path), total=12, shards=2)
    assert again.actors == svc.actors  # get_if_exists: the same service by name
    kill_memory_service(svc)


@pytest.mark.ray
def test_bench_memory_runs_on_the_jobs_backbone(shared_ray) -> None:
    """``distcl bench memory --backbone resnet32`` end to end on a few steps (no timing
    assertions: a benchmark reports, the test checks it runs and its figures agree)."""
    from distcl.bench.memory import format_memory_bench, run_memory_bench

    r = run_memory_bench(classes=4, per_class=3, image=(1, 28, 28), batch_size=4, steps=2,
                         shards=2, backbone="resnet32")  # fmt: skip
    assert (r["memory_rows"], r["replay_rows"], r["net"]) == (12, 4, "resnet32")
    assert r["step_plain_ms"] > 0 and r["step_replay_ms"] > 0 and r["sample_ms"] > 0
    assert r["sampling_overhead"] == pytest.approx(r["sample_ms"] / r["step_plain_ms"])
    assert "resnet32, images 1x28x28, batch 4 + 4 replayed rows" in format_memory_bench(r)

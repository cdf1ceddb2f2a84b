"""Tests of the Parquet gallery store (distcl.gallery.store): format, atomicity, validation,
filters and the stale (deployment) gallery.

Run: .venv/bin/python -m pytest tests/test_gallery_store.py -q
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from distcl.gallery import write as gallery_write
from distcl.gallery.store import (
    PartInfo,
    iter_batches,
    iter_embedding_batches,
    list_parts,
    open_store,
    read_embeddings,
    stale_gallery,
    write_embeddings,
)


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_round_trip_keeps_type_metadata_and_values(tmp_path):
    emb = unit(5, 8)
    path = write_embeddings(
        tmp_path, 2, "rank0", list("abcde"), [4, 3, 2, 1, 0], [1, 1, 2, 2, 2], emb
    )
    assert path == tmp_path / "model=2" / "rank0.parquet"
    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert schema.field("item_id").type == pa.string()
    assert schema.field("label").type == pa.int64()
    assert schema.field("task").type == pa.int32()
    assert schema.field("model").type == pa.int32()
    md = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert md == {
        "distcl.format_version": "1",
        "distcl.model": "2",
        "distcl.dim": "8",
        "distcl.metric": "ip",
        "distcl.normalized": "true",
    }
    g = read_embeddings(tmp_path)
    assert g.item_ids.tolist() == list("abcde")
    assert g.labels.dtype == np.int64 and g.labels.tolist() == [4, 3, 2, 1, 0]
    assert g.tasks.dtype == np.int32 and g.tasks.tolist() == [1, 1, 2, 2, 2]
    assert g.models.dtype == np.int32 and g.models.tolist() == [2] * 5
    assert g.embeddings.dtype == np.float32 and g.embeddings.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(g.embeddings, emb)
    assert g.dim == 8 and len(g) == 5


def test_store_reads_as_hive_dataset_in_plain_pyarrow(tmp_path):
    write_embeddings(tmp_path, 0, "p", ["a", "b"], [0, 1], [0, 0], unit(2, 4))
    write_embeddings(tmp_path, 1, "p", ["a"], [0], [0], unit(1, 4, seed=1))
    t = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert sorted(zip(t["model"].to_pylist(), t["item_id"].to_pylist(), strict=True)) == [
        (0, "a"),
        (0, "b"),
        (1, "a"),
    ]


def test_normalized_false_is_recorded_and_allows_any_norm(tmp_path):
    emb = np.array([[3.0, 4.0]], np.float64)
    path = write_embeddings(tmp_path, 0, "p", ["x"], [0], [0], emb, normalized=False)
    assert pq.read_schema(path).metadata[b"distcl.normalized"] == b"false"
    np.testing.assert_array_equal(read_embeddings(tmp_path).embeddings, [[3.0, 4.0]])
    with pytest.raises(ValueError, match="norm"):
        write_embeddings(tmp_path, 0, "q", ["y"], [0], [0], emb)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    write_embeddings(tmp_path, 0, "rank0", ["a"], [0], [0], unit(1, 4))
    write_embeddings(tmp_path, 0, "rank0", ["a"], [0], [0], unit(1, 4, seed=3))
    assert files_in(tmp_path / "model=0") == ["rank0.parquet"]


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    old = unit(3, 4)
    write_embeddings(tmp_path, 0, "rank0", ["a", "b", "c"], [0, 1, 2], [0, 0, 0], old)

    class CrashingWriter(pq.ParquetWriter):
        def write_table(self, *args, **kwargs):
            raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(pq, "ParquetWriter", CrashingWriter)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_embeddings(tmp_path, 0, "rank0", ["x"], [9], [0], unit(1, 4, seed=1))
    monkeypatch.undo()
    assert files_in(tmp_path / "model=0") == ["rank0.parquet"]
    g = read_embeddings(tmp_path)
    assert g.item_ids.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(g.embeddings, old)


def test_rewriting_a_part_replaces_rows(tmp_path):
    for seed in range(3):  # e.g. a task re-run after a crash
        write_embeddings(tmp_path, 1, "rank0", ["a", "b"], [0, 1], [1, 1], unit(2, 4, seed))
    g = read_embeddings(tmp_path)
    assert g.item_ids.tolist() == ["a", "b"]
    np.testing.assert_array_equal(g.embeddings, unit(2, 4, 2))


def test_multiple_row_groups_read_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(gallery_write, "ROW_GROUP_BYTES", 4 * 4 * 3)  # 3 rows per group at d=4
    emb = unit(10, 4)
    ids = [f"i{i}" for i in range(10)]
    path = write_embeddings(tmp_path, 0, "p", ids, np.arange(10), np.arange(10) % 3, emb)
    assert pq.ParquetFile(path).num_row_groups == 4
    g = read_embeddings(tmp_path)
    np.testing.assert_array_equal(g.embeddings, emb)
    assert read_embeddings(tmp_path, tasks=[1]).item_ids.tolist() == ["i1", "i4", "i7"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embeddings=np.ones(4, np.float32)), "embeddings must be 2-D"),
        (dict(embeddings=np.ones((2, 4), np.int64)), "embeddings must be floating"),
        (dict(embeddings=np.full((2, 2), np.nan, np.float32)), "NaN"),
        (dict(labels=[0, 1, 2]), "labels"),
        (dict(labels=[0.5, 1.5]), "labels must hold integers"),
        (dict(tasks=[0]), "tasks"),
        (dict(item_ids=["a"]), "item_ids"),
        (dict(item_ids=[1, 2]), r"item_ids\[0\]"),
        (dict(item_ids=["a", "a"]), "duplicates.*'a'"),
        (dict(part="../escape"), "part"),
        (dict(part="p.parquet"), "part"),
        (dict(model=-1), "model"),
    ],
)
def test_bad_write_inputs_raise(tmp_path, kwargs, match):
    args = dict(
        model=0, part="p", item_ids=["a", "b"], labels=[0, 1], tasks=[0, 0], embeddings=unit(2, 2)
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        write_embeddings(tmp_path, **args)
    assert not (tmp_path / "model=0").exists() or files_in(tmp_path / "model=0") == []


def test_mixed_dimension_write_names_the_other_file(tmp_path):
    """One model's rows have one size (another model may have another: model.upgrades)."""
    first = write_embeddings(tmp_path, 0, "rank0", ["a"], [0], [0], unit(1, 8))
    with pytest.raises(ValueError, match=f"dim 4.*dim 8 in {first}"):
        write_embeddings(tmp_path, 0, "rank1", ["b"], [0], [0], unit(1, 4))
    # replacing the only part with another dim is allowed: the old file leaves the gallery
    write_embeddings(tmp_path, 0, "rank0", ["a"], [0], [0], unit(1, 4))
    assert list_parts(tmp_path) == [PartInfo(0, "rank0", 1, 4)]


def test_models_of_different_sizes_read_one_size_at_a_time(tmp_path):
    """model.upgrades changes the embedding size between models: the store holds both, a
    read of one size works, a read across sizes says so."""
    write_embeddings(tmp_path / "a", 0, "p", ["x", "y"], [0, 1], [0, 0], unit(2, 8))
    other = write_embeddings(tmp_path / "b", 1, "p", ["x"], [0], [0], unit(1, 4))
    (tmp_path / "a" / "model=1").mkdir()
    os.replace(other, tmp_path / "a" / "model=1" / "p.parquet")
    store = open_store(tmp_path / "a")
    assert store.dims == {0: 8, 1: 4} and store.dim is None and len(store.datasets) == 2
    assert read_embeddings(tmp_path / "a", models=[1]).embeddings.shape == (1, 4)
    assert read_embeddings(tmp_path / "a", models=[0]).embeddings.shape == (2, 8)
    rows = [rb.num_rows for rb in iter_batches(store, columns=("item_id",))]
    assert sum(rows) == 3  # every part, whatever its size
    with pytest.raises(ValueError, match=r"sizes \[4, 8\].*one size at a time"):
        read_embeddings(tmp_path / "a")


def test_parts_of_one_model_with_different_sizes_are_refused_naming_files(tmp_path):
    write_embeddings(tmp_path / "a", 0, "p", ["x"], [0], [0], unit(1, 8))
    other = write_embeddings(tmp_path / "b", 0, "q", ["y"], [0], [0], unit(1, 4))
    os.replace(other, tmp_path / "a" / "model=0" / "q.parquet")
    with pytest.raises(
        ValueError, match="mixed-dimension gallery: .*q.parquet has dim 4.*same model 0"
    ):
        read_embeddings(tmp_path / "a")


def test_stale_gallery_picks_arrival_model_rows(tmp_path):
    # items a, b arrive at task 0; c at task 1; d at task 2. Model m re-embeds every item
    # that has arrived by task m (a second part of model 2 holds d).
    e = {
        (item, m): unit(1, 4, seed=10 * m + i)[0] for i, item in enumerate("abcd") for m in range(3)
    }
    arrival = {"a": 0, "b": 0, "c": 1, "d": 2}
    for m in range(3):
        items = [x for x in "abc" if arrival[x] <= m]
        write_embeddings(
            tmp_path,
            m,
            "rank0",
            items,
            [ord(x) for x in items],
            [arrival[x] for x in items],
            np.stack([e[x, m] for x in items]),
        )
    write_embeddings(tmp_path, 2, "rank1", ["d"], [ord("d")], [2], e["d", 2][None])

    g = stale_gallery(tmp_path, 1)
    assert g.item_ids.tolist() == ["a", "b", "c"]
    assert g.models.tolist() == g.tasks.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(g.embeddings, np.stack([e["a", 0], e["b", 0], e["c", 1]]))

    g2 = stale_gallery(tmp_path, 2)
    assert sorted(zip(g2.item_ids.tolist(), g2.models.tolist(), strict=True)) == [
        ("a", 0),
        ("b", 0),
        ("c", 1),
        ("d", 2),
    ]
    assert len(stale_gallery(tmp_path, 0)) == 2
    assert stale_gallery(tmp_path, -1).embeddings.shape == (0, 4)

    # read filters: models prune folders, tasks filter rows
    g3 = read_embeddings(tmp_path, models=[2], tasks=[0, 2])
    assert g3.item_ids.tolist() == ["a", "b", "d"] and g3.models.tolist() == [2, 2, 2]
    assert len(read_embeddings(tmp_path)) == 2 + 3 + 4
    assert list_parts(tmp_path) == [
        PartInfo(0, "rank0", 2, 4),
        PartInfo(1, "rank0", 3, 4),
        PartInfo(2, "rank0", 3, 4),
        PartInfo(2, "rank1", 1, 4),
    ]


def test_iter_batches_match_in_memory_read(tmp_path):
    write_embeddings(
        tmp_path, 0, "p0", [f"a{i}" for i in range(7)], np.arange(7), np.zeros(7, int), unit(7, 4)
    )
    write_embeddings(
        tmp_path,
        1,
        "p0",
        [f"b{i}" for i in range(5)],
        np.arange(5),
        np.ones(5, int),
        unit(5, 4, seed=1),
    )
    batches = list(iter_embedding_batches(tmp_path, batch_rows=3))
    assert [len(b.item_ids) for b in batches] == [3, 3, 1, 3, 2]
    whole = read_embeddings(tmp_path)
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]), whole.embeddings)
    assert np.concatenate([b.item_ids for b in batches]).tolist() == whole.item_ids.tolist()
    only1 = list(iter_embedding_batches(tmp_path, batch_rows=100, models=1))
    assert len(only1) == 1 and only1[0].labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_rows"):
        next(iter_embedding_batches(tmp_path, batch_rows=0))


def test_a_slow_consumer_holds_one_row_group_not_the_files(tmp_path, monkeypatch):
    """Arrow's threaded dataset scan read whole files ahead of a slow consumer (a search);
    ``iter_batches`` holds at most about one row group in Arrow's memory, and yields the
    rows in (model, part, row) order, a filter pruning row groups by their statistics."""
    d, group_rows = 64, 512
    monkeypatch.setattr(gallery_write, "ROW_GROUP_BYTES", 4 * d * group_rows)
    n = 8 * group_rows  # 8 row groups (1 MiB of embeddings) per part, 3 parts
    for p in range(3):
        ids = [f"p{p}-{i:05d}" for i in range(n)]
        write_embeddings(tmp_path, 0, f"part-{p}", ids, np.arange(n) + p * n,
                         np.zeros(n, int), unit(n, d, seed=p))  # fmt: skip
    pool, most, order = pa.system_memory_pool(), 0, []
    for rb in iter_batches(tmp_path, 0, columns=("item_id", "embedding"), batch_rows=4096):
        time.sleep(0.01)  # the consumer is slower than the reader
        most = max(most, pool.bytes_allocated())
        order += rb["item_id"].to_pylist()
    assert order == [f"p{p}-{i:05d}" for p in range(3) for i in range(n)]
    group_bytes = 4 * d * group_rows
    assert most <= 3 * group_bytes, (most, group_bytes)  # one file alone is 8 groups
    # label statistics exclude all but one group of part 1
    lo = n + 3 * group_rows
    filt = (ds.field("label") >= lo) & (ds.field("label") < lo + 10)
    rows = [r for rb in iter_batches(tmp_path, 0, columns=("label",), filter=filt)
            for r in rb["label"].to_pylist()]  # fmt: skip
    assert rows == list(range(lo, lo + 10))


def test_empty_results_and_missing_root(tmp_path):
    write_embeddings(tmp_path, 0, "p", ["a"], [0], [0], unit(1, 6))
    g = read_embeddings(tmp_path, tasks=[99])
    assert g.embeddings.shape == (0, 6) and g.item_ids.shape == (0,)
    (tmp_path / "empty").mkdir()
    assert read_embeddings(tmp_path / "empty").embeddings.shape == (0, 0)
    assert list_parts(tmp_path / "empty") == []
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_embeddings(tmp_path / "nowhere")


def test_duplicate_ids_across_parts_of_one_model_raise_on_read(tmp_path):
    write_embeddings(tmp_path, 0, "rank0", ["a", "b"], [0, 1], [0, 0], unit(2, 4))
    write_embeddings(tmp_path, 0, "rank1", ["b"], [1], [0], unit(1, 4))
    write_embeddings(tmp_path, 1, "rank0", ["b"], [1], [0], unit(1, 4))  # other model: fine
    with pytest.raises(ValueError, match="duplicate item_id 'b'.*rank0.parquet.*rank1.parquet"):
        read_embeddings(tmp_path)
    assert len(read_embeddings(tmp_path, models=1)) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_part_raises_naming_file(tmp_path, damage):
    path = write_embeddings(tmp_path, 0, "rank0", ["a", "b"], [0, 1], [0, 0], unit(2, 4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not parquet" * 10)
    for fn in (
        list_parts,
        read_embeddings,
        lambda r: stale_gallery(r, 0),
        lambda r: list(iter_embedding_batches(r)),
    ):
        with pytest.raises(ValueError, match=f"corrupt or unreadable gallery part {path}"):
            fn(tmp_path)

"""The storage layer (``distcl.storage``) on local paths and on a real S3-compatible server
(moto on 127.0.0.1, ``tests/s3server.py``): reads, atomic writes, listing, errors naming the URI.

Run: ``.venv/bin/python -m pytest tests/test_storage.py -q``
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcl import storage
from distcl.storage import Uri


def test_locations_parse_paths_and_uris(tmp_path):
    assert storage.location("runs/x") == Path("runs/x")
    assert storage.location(f"file://{tmp_path}") == tmp_path
    u = storage.location("s3://bucket//runs/q/")
    assert isinstance(u, Uri) and str(u) == "s3://bucket/runs/q" and u.path == "bucket/runs/q"
    m = u / "models" / "0" / "model.pt"
    assert (m.name, m.stem, m.suffix, str(m.parent)) == (
        "model.pt", "model", ".pt", "s3://bucket/runs/q/models/0")  # fmt: skip
    assert m.with_name("meta.json") == Uri("s3://bucket/runs/q/models/0/meta.json")
    assert storage.is_uri("gs://b/k") and not storage.is_uri("/tmp/x")
    with pytest.raises(ValueError, match="ftp://h/x"):
        storage.location("ftp://h/x")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        Uri("s3://b/a/../c")
    with pytest.raises(TypeError):  # no __fspath__: local file APIs refuse a URI
        open(u)  # noqa: SIM115


@pytest.mark.parametrize("where", ["local", "s3"])
def test_put_get_list_delete(where, tmp_path, request):
    root = (
        tmp_path
        if where == "local"
        else storage.location(request.getfixturevalue("s3").prefix("ops"))
    )
    a = root / "dir" / "a.json"
    assert not storage.exists(a) and storage.stat(a) is None and storage.listdir(root) == []
    storage.write_json(a, {"v": 1})
    storage.write_bytes(root / "dir" / "b.bin", b"x" * 5000)
    assert storage.read_json(a) == {"v": 1} and storage.is_file(a) and not storage.is_dir(a)
    assert storage.is_dir(root / "dir") and storage.exists(root / "dir")
    assert [(e.name, e.size, e.is_dir) for e in storage.listdir(root / "dir")] == [
        ("a.json", 8, False), ("b.bin", 5000, False)]  # fmt: skip
    assert [e.name for e in storage.listdir(root)] == ["dir"]
    assert storage.tail(root / "dir" / "b.bin", 1024) == b"x" * 1024
    with storage.open_input(root / "dir" / "b.bin") as f:
        assert f.read(10) == b"x" * 10
    storage.write_json(a, {"v": 2})  # replaced whole
    assert storage.read_json(a) == {"v": 2} and storage.size(a) == 8
    assert [str(p) for p in storage.walk_files(root)] == [str(root / "dir" / n)
                                                          for n in ("a.json", "b.bin")]  # fmt: skip
    storage.delete(a)
    storage.delete(a)  # missing_ok
    assert not storage.exists(a)
    storage.delete_dir(root / "dir")
    assert storage.listdir(root) == [] and not storage.is_dir(root / "dir")
    fs, path = storage.filesystem(root / "t.parquet")  # Parquet through pyarrow.fs
    pq.write_table(pa.table({"x": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs)["x"].to_pylist() == [1, 2]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_copy_staged_and_relative(where, tmp_path, request):
    """What tuning on any storage uses: copies (server-side within a bucket, and across
    local and bucket), a local folder staged into the location, paths below a root."""
    s3 = request.getfixturevalue("s3") if where == "s3" else None
    root = tmp_path / "root" if s3 is None else storage.location(s3.prefix("copy"))
    src = storage.write_bytes(root / "a" / "x.bin", b"abc" * 1000)
    for dst in (root / "b" / "x.bin", tmp_path / "local" / "x.bin"):
        storage.copy(src, dst)
        assert storage.read_bytes(dst) == b"abc" * 1000
    storage.copy(tmp_path / "local" / "x.bin", root / "c" / "x.bin")  # local -> root
    assert storage.read_bytes(root / "c" / "x.bin") == b"abc" * 1000
    assert storage.relative(root / "c" / "x.bin", root) == "c/x.bin"
    with pytest.raises(ValueError, match="not below"):
        storage.relative(root / "c", root / "a")
    with storage.staged(root / "out") as local:
        assert isinstance(local, Path)
        (local / "t.md").write_text("table")
        (local / "sub").mkdir()
        (local / "sub" / "p.png").write_bytes(b"png")
    assert storage.read_text(root / "out" / "t.md") == "table"
    assert storage.read_bytes(root / "out" / "sub" / "p.png") == b"png"
    with pytest.raises(RuntimeError), storage.staged(root / "failed") as local:
        (local / "half.md").write_text("half")
        raise RuntimeError("a plot failed")
    if s3 is not None:  # an error uploads nothing (a local folder keeps what was written)
        assert not storage.exists(root / "failed" / "half.md")
    assert not list(tmp_path.rglob("s3:*"))


def test_an_object_is_written_only_when_complete(s3, tmp_path):
    """An upload publishes a finished file whole; a source that cannot be read publishes
    nothing and the previous object stays."""
    root = storage.location(s3.prefix("atomic"))
    storage.write_bytes(root / "m.json", b'{"v": 1}')
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))  # above the multipart part size
    storage.upload(big, root / "big.bin")
    assert storage.read_bytes(root / "big.bin") == big.read_bytes()
    with pytest.raises(FileNotFoundError):
        storage.upload(tmp_path / "missing.bin", root / "m.json")
    assert storage.read_bytes(root / "m.json") == b'{"v": 1}'
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    storage.upload(empty, root / "empty")
    assert storage.read_bytes(root / "empty") == b""


def test_errors_name_the_uri(s3):
    missing = Uri(f"s3://{s3.bucket}/nothing/here.json")
    with pytest.raises(FileNotFoundError, match="s3://distcl-test/nothing/here.json"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-x/k"):
        storage.read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(OSError, match="s3://no-such-bucket-x/k"):
        storage.write_bytes("s3://no-such-bucket-x/k", b"1")


def test_local_writes_stay_atomic_renames(tmp_path):
    storage.write_text(tmp_path / "sub" / "r.md", "hello")
    assert (tmp_path / "sub" / "r.md").read_text() == "hello"
    assert not [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp-")]


def test_run_dir_lock_on_an_object_store(s3):
    from distcl.rundir import RunDir, RunDirBusy

    rd = RunDir(s3.prefix("lock"))
    assert rd.is_remote and rd.model(2) == Uri(f"{rd.root}/models/2")
    with rd.lock():
        assert storage.read_json(rd.root / ".lock")["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match="in use"), RunDir(str(rd.root)).lock():
            pass  # the driver-local flock keyed by the URI
    assert not storage.exists(rd.root / ".lock")
    storage.write_json(rd.root / ".lock", {"pid": 7, "host": "elsewhere", "since": "x"})
    with pytest.raises(RunDirBusy, match=r"pid 7 on elsewhere.*delete s3://"), rd.lock():
        pass


def test_gallery_store_on_an_object_store(s3):
    """Parquet parts written as single objects, discovered and streamed back through the
    bucket's filesystem; errors name the s3:// part."""
    import numpy as np

    from distcl.gallery.store import list_parts, open_store, read_embeddings, write_embeddings

    root = storage.location(s3.prefix("gallery"))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for rank in (0, 1):
        rows = slice(3 * rank, 3 * rank + 3)
        path = write_embeddings(root, 2, f"part-{rank}", [f"i{k}" for k in range(6)][rows],
                                [0, 1, 2, 0, 1, 2][rows], [1] * 3, emb[rows])  # fmt: skip
        assert path == root / "model=2" / f"part-{rank}.parquet"
    assert [p.name for p in storage.listdir(root / "model=2")] == ["part-0.parquet",
                                                                    "part-1.parquet"]  # fmt: skip
    store = open_store(root)
    assert store.parts[0][0] == f"{root}/model=2/part-0.parquet"
    assert [(p.model, p.part, p.rows, p.dim) for p in list_parts(root)] == [
        (2, "part-0", 3, 4), (2, "part-1", 3, 4)]  # fmt: skip
    got = read_embeddings(root, models=[2])
    np.testing.assert_array_equal(got.embeddings, emb)
    assert got.item_ids.tolist() == [f"i{k}" for k in range(6)]
    # a gallery shard (the parts one search task reads) on the bucket: its rows, not none
    from distcl.gallery.store import iter_batches, sub_store

    shard = sub_store(store, [store.parts[1][0]])
    ids = [i for rb in iter_batches(shard) for i in rb["item_id"].to_pylist()]
    assert ids == ["i3", "i4", "i5"]
    storage.write_bytes(root / "model=3" / "part-0.parquet", b"not parquet")
    with pytest.raises(ValueError, match=rf"{root}/model=3/part-0.parquet"):
        open_store(root)
    with pytest.raises(FileNotFoundError, match=rf"gallery store {root}/none does not exist"):
        open_store(root / "none")

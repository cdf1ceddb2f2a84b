"""Shards on an object store: built to ``s3://`` (moto on 127.0.0.1, ``tests/s3server.py``),
verified quick (listing sizes) and deep (sha256), streamed back by WebDataset through the
registered ``gopen`` handler, and a damaged object named and rebuilt alone.

Run: ``.venv/bin/python -m pytest tests/test_shards_s3.py -q``
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from distcl import storage
from distcl.data.readers import iter_shard, load_arrays
from distcl.data.shards import (
    MANIFEST,
    ShardError,
    build_shards,
    load_manifest,
    shard_paths,
    verify_shards,
)
from distcl.data.sources import open_source
from distcl.storage import Uri

SMALL = {"synthetic_train_per_class": 16, "synthetic_test_per_class": 4}


@pytest.fixture
def s3_shards(s3, synthetic_job):
    job = synthetic_job(data={**SMALL, "shards_dir": s3.prefix("shards")},
                        scenario={"tasks": 2, "max_tasks": 1})  # fmt: skip
    out, scen, rebuilt = build_shards(job)
    return job, out, scen, rebuilt


def test_built_verified_and_read_back_from_s3(s3_shards, tmp_path):
    job, out, scen, rebuilt = s3_shards
    assert rebuilt and isinstance(out, Uri) and out == job.shards_dir
    names = {e.name for e in storage.listdir(out)}
    manifest = load_manifest(out)
    assert names == {MANIFEST} | {s["name"] for s in manifest["shards"]}  # no temp objects
    assert (
        verify_shards(out)
        == verify_shards(out, deep=True)
        == {
            "shards": len(manifest["shards"]),
            "samples": sum(s["count"] for s in manifest["shards"]),
        }
    )
    src = open_source(job.data, job.seed)
    task = scen.tasks[0]
    paths = shard_paths(out, 0, "train")
    assert all(isinstance(p, Uri) for p in paths)
    keys, images, labels, metas = load_arrays(paths)
    order = np.argsort([m["index"] for m in metas])
    assert [metas[i]["index"] for i in order] == task.train_items.tolist()
    np.testing.assert_array_equal(
        images[order], np.stack([src.image("train", i) for i in task.train_items])
    )
    # the same bytes as a local build of the same job (deterministic shards)
    local = job.model_copy(update={"data": job.data.model_copy(update={"shards_dir": None}),
                                   "output": job.output.model_copy(
                                       update={"root": str(tmp_path / "runs")})})  # fmt: skip
    out_local, _, _ = build_shards(local)
    assert load_manifest(out_local)["shards"] == manifest["shards"]
    # a rebuild with the same inputs rewrites nothing
    before = {e.name: e.mtime_ns for e in storage.listdir(out)}
    assert build_shards(job)[2] is False
    assert {e.name: e.mtime_ns for e in storage.listdir(out)} == before


def test_a_damaged_object_is_named_and_rebuilt_alone(s3_shards):
    job, out, _, _ = s3_shards
    # cut at a sample boundary, padded to the same size: only the count tells
    other = out / "task00-train-00002.tar"
    whole = storage.read_bytes(other)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    cut = members[5].offset_data + (members[5].size + 511) // 512 * 512
    storage.write_bytes(other, whole[:cut] + bytes(len(whole) - cut))
    verify_shards(out)  # quick: the size is right
    with pytest.raises(ShardError, match=rf"{other}: short read, 2 samples"):
        list(iter_shard(other))
    assert storage.exists(other.with_name(f".{other.name}.damaged"))  # the reader's note
    victim = out / "task00-train-00001.tar"
    data = storage.read_bytes(victim)
    storage.write_bytes(victim, data[: len(data) // 2])
    with pytest.raises(ShardError, match=rf"{victim}: size differs from manifest"):
        verify_shards(out)
    with pytest.raises(ShardError, match=rf"{victim}: sha256 differs"):
        verify_shards(out, deep=True)
    logs = []
    _, _, rebuilt = build_shards(job, log=logs.append)
    assert rebuilt and sorted(logs) == [
        f"{victim}: found damaged by a reader (sha256 differs from manifest); rebuilding",
        f"{other}: found damaged by a reader (short read, 2 samples but the manifest lists "
        "16); rebuilding",
    ]
    assert storage.read_bytes(victim) == data and storage.read_bytes(other) == whole
    assert not storage.exists(other.with_name(f".{other.name}.damaged"))
    verify_shards(out, deep=True)


def test_missing_manifest_and_object_name_the_uri(s3):
    empty = storage.location(s3.prefix("none"))
    with pytest.raises(ShardError, match=rf"{empty}/manifest.json: no manifest"):
        load_manifest(empty)
    with pytest.raises(ShardError, match=rf"{empty}/x.tar: cannot read shard"):
        list(iter_shard(empty / "x.tar", expected=1))


def test_cli_builds_and_verifies_on_s3(s3, synthetic_raw_job, tmp_path, capsys):
    import yaml

    from distcl.cli import main

    raw = synthetic_raw_job(tmp_path, data=SMALL, scenario={"tasks": 2, "max_tasks": 1},
                            output={"root": s3.prefix("cli")})  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["data", "build", str(path), "--local"]) == 0
    assert main(["data", "verify", str(path), "--deep"]) == 0
    out = capsys.readouterr().out
    assert f"{raw['output']['root']}/shards/" in out and "OK (" in out
    assert not (tmp_path / "s3:").exists()  # nothing local named after the URI

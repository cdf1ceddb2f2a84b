"""``distcl bench data`` runs end to end on a tiny set and reports consistent figures
(no timing assertions: benchmarks report, tests check they run and agree).

Run: ``.venv/bin/python -m pytest tests/test_bench_data.py -q`` (marker ``ray``)
"""

from __future__ import annotations

import pytest

from distcl.bench.data import format_data_bench, run_data_bench

pytestmark = pytest.mark.ray


def test_bench_data_tiny_run_writes_identical_shards():
    r = run_data_bench(per_class=12, shard_size=20, tasks=(1, 2), log=lambda *a: None)
    assert r["byte_identical"] is True
    assert r["samples"] == 10 * 12 + 10 * 2 and r["shards"] >= 5
    assert set(r["ray_samples_per_s"]) == {1, 2} and all(
        v > 0 for v in r["ray_samples_per_s"].values()
    )
    text = format_data_bench(r)
    assert "2 Ray task(s) in flight" in text and "byte-identical across all variants: yes" in text


def test_bench_data_writes_to_an_object_store_and_cleans_up(s3):
    import ray

    from distcl import storage

    if ray.is_initialized():  # the bench's own Ray starts after the AWS variables are set
        ray.shutdown()
    root = s3.prefix("bench")
    r = run_data_bench(per_class=6, shard_size=20, tasks=(1,), rounds=1, log=lambda *a: None,
                       out=root)  # fmt: skip
    assert r["byte_identical"] is True and r["out"] == root
    assert f"written to {root}" in format_data_bench(r)
    assert not storage.is_dir(storage.location(root)) or not list(
        storage.walk_files(storage.location(root))
    )  # its sub-folder is gone

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

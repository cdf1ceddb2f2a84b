"""Tests of the search index (distcl.gallery.index) against the numpy brute-force reference
and faiss's own blocked ground truth, on seeded synthetic data.

Run: .venv/bin/python -m pytest tests/test_index.py -q   (GPU part: -m gpu, skipped without one)
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from faiss.contrib.exhaustive_search import knn_ground_truth
from reference import search_blocked

from distcl.gallery.index import (
    GPU_MAX_K,
    SearchIndex,
    brute_force_search,
    build_index,
    gpu_available,
    recall_at_k_vs_exact,
)


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = unit(n_clusters, d, seed + 1)
    x = centers[rng.integers(0, n_clusters, n)] + 0.3 / np.sqrt(d) * rng.standard_normal(
        (n, d)
    ).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_same_topk(s1, i1, s2, i2, atol=1e-5):
    """Equal up to ties: scores match everywhere; ids match wherever the score differs from
    the other scores of its row and from the k-th score (a tie there may continue past k)."""
    assert s1.shape == s2.shape == i1.shape == i2.shape
    np.testing.assert_allclose(s1, s2, atol=atol)
    for r in range(s1.shape[0]):
        gaps = np.abs(s1[r][:, None] - s1[r][None, :]) + np.eye(s1.shape[1]) * 1e9
        distinct = (gaps.min(axis=1) > atol) & (np.abs(s1[r] - s1[r, -1]) > atol)
        np.testing.assert_array_equal(i1[r][distinct], i2[r][distinct])
        # tied groups away from the boundary hold the same ids, in any order
        tied = ~distinct & (np.abs(s1[r] - s1[r, -1]) > atol)
        assert sorted(i1[r][tied]) == sorted(i2[r][tied])


@pytest.fixture(scope="module")
def data():
    return unit(3000, 16, seed=0), unit(200, 16, seed=1)


def test_brute_force_golden():
    gallery = np.array([[1, 0], [0, 1], [0.6, 0.8], [1, 0], [-1, 0]], np.float32)
    queries = np.array([[1, 0], [0, 1]], np.float32)
    scores, ids = brute_force_search(queries, gallery, 3)
    # query 0: scores 1, 0, 0.6, 1, -1 -> ties 0 and 3 at 1.0, lower index first
    np.testing.assert_allclose(scores, [[1, 1, 0.6], [1, 0.8, 0]], atol=1e-7)
    assert ids.tolist() == [[0, 3, 2], [1, 2, 0]]  # query 1: 0, 3 tie at 0 -> 0 wins
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_brute_force_boundary_ties_prefer_lower_index():
    gallery = np.zeros((50, 4), np.float32)
    gallery[:, 0] = 1.0  # 50 identical rows: argpartition alone would pick arbitrary ones
    gallery[37] = [0, 1, 0, 0]
    q = np.array([[1, 0.5, 0, 0]], np.float32)
    scores, ids = brute_force_search(q, gallery, 5)
    assert ids.tolist() == [[0, 1, 2, 3, 4]]
    scores, ids = brute_force_search(q, gallery, 50)
    assert ids[0, -1] == 37 and ids[0, :49].tolist() == [i for i in range(50) if i != 37]


def test_flat_equals_brute_force(data):
    gallery, queries = data
    index = build_index(gallery, use_gpu=False)
    assert (index.ntotal, index.dim) == (3000, 16)
    s, i = index.search(queries, 10)
    s_ref, i_ref = brute_force_search(queries, gallery, 10)
    assert_same_topk(s, i, s_ref, i_ref)


def test_flat_with_exact_duplicate_rows_equals_brute_force():
    base = unit(100, 8, seed=3)
    gallery = np.concatenate([base, base, base[:20]])  # every score appears 2-3 times
    queries = unit(30, 8, seed=4)
    s, i = build_index(gallery, use_gpu=False).search(queries, 7)
    s_ref, i_ref = brute_force_search(queries, gallery, 7)
    assert_same_topk(s, i, s_ref, i_ref)
    # the tied ids found are copies of the same base row
    np.testing.assert_array_equal(i % 100, i_ref % 100)


def test_query_batching_and_dtype_conversion(data):
    gallery, queries = data
    s1, i1 = build_index(gallery, use_gpu=False).search(queries, 5)
    small = build_index(gallery.astype(np.float64), use_gpu=False, query_batch=7)
    s2, i2 = small.search(queries.astype(np.float64), 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert s2.dtype == np.float32 and i2.dtype == np.int64


def test_add_appends_ids_and_k_is_clamped(data):
    gallery, queries = data
    index = build_index(gallery[:10], use_gpu=False)
    index.add(gallery[10:15])
    s, i = index.search(queries[:3], 100)
    assert s.shape == i.shape == (3, 15)  # k clamped to ntotal
    s_ref, i_ref = brute_force_search(queries[:3], gallery[:15], 100)
    assert_same_topk(s, i, s_ref, i_ref)
    empty = build_index(np.empty((0, 16), np.float32), use_gpu=False)
    assert empty.ntotal == 0
    with pytest.raises(ValueError, match="empty index"):
        empty.search(queries, 1)


def test_blocked_equals_flat_and_faiss_ground_truth(data):
    gallery, queries = data
    s_flat, i_flat = build_index(gallery, use_gpu=False).search(queries, 20)
    bounds = [0, 7, 7, 1000, 1013, 2500, 3000]  # uneven blocks, one empty, some < k
    blocks = [(a, gallery[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    s_blk, i_blk = search_blocked(queries, iter(blocks), 20)
    assert_same_topk(s_blk, i_blk, s_flat, i_flat)
    s_gt, i_gt = knn_ground_truth(
        queries, (b for _, b in blocks), 20, metric_type=faiss.METRIC_INNER_PRODUCT
    )
    assert_same_topk(s_blk, i_blk, s_gt, i_gt)
    s_few, i_few = search_blocked(queries, [(0, gallery[:4])], 20)
    assert s_few.shape == (200, 4) and set(i_few[0]) == {0, 1, 2, 3}


def test_ivf_recall_is_reported_and_exact_when_probing_all_lists():
    gallery = clustered(4000, 32, 40, seed=0)
    queries = clustered(300, 32, 40, seed=5)
    _, i_exact = brute_force_search(queries, gallery, 10)
    ivf = build_index(gallery, "ivf", nlist=64, nprobe=2, use_gpu=False)
    assert ivf.kind == "ivf" and ivf.ntotal == 4000
    _, i_ivf = ivf.search(queries, 10)
    recall = recall_at_k_vs_exact(i_ivf, i_exact, 10)
    assert 0.3 < recall <= 1.0
    full = build_index(gallery, "ivf", nlist=64, nprobe=64, use_gpu=False)
    s_full, i_full = full.search(queries, 10)
    s_ref, i_ref = brute_force_search(queries, gallery, 10)
    assert_same_topk(s_full, i_full, s_ref, i_ref)
    assert recall_at_k_vs_exact(i_full, i_exact, 10) > 0.999


def test_ivf_default_nlist_and_bad_params(data):
    gallery, _ = data
    assert build_index(gallery, "ivf", use_gpu=False).index.nlist == 3000 // 39  # N/39 < 4 sqrt N
    with pytest.raises(ValueError, match="nlist"):
        build_index(gallery, "ivf", nlist=0, use_gpu=False)
    with pytest.raises(ValueError, match="nprobe"):
        build_index(gallery, "ivf", nlist=8, nprobe=0, use_gpu=False)


def test_recall_at_k_golden():
    approx = np.array([[1, 2, 3], [4, -1, 6]])
    exact = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at_k_vs_exact(approx, exact, 3) == pytest.approx(4 / 6)
    assert recall_at_k_vs_exact(approx, exact, 1) == pytest.approx(1 / 2)
    assert recall_at_k_vs_exact(exact, exact, 3) == 1.0
    with pytest.raises(ValueError, match="k=4"):
        recall_at_k_vs_exact(approx, exact, 4)
    with pytest.raises(ValueError, match="equal rows"):
        recall_at_k_vs_exact(approx[:1], exact, 2)


def test_bad_inputs_raise(data):
    gallery, queries = data
    index = build_index(gallery, use_gpu=False)
    with pytest.raises(ValueError, match="queries have dim 8, index has dim 16"):
        index.search(queries[:, :8], 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="queries contains NaN"):
        index.search(np.full((1, 16), np.nan), 1)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        index.search(queries[0], 1)
    with pytest.raises(ValueError, match="embeddings have dim 4"):
        index.add(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="kind"):
        build_index(gallery, "hnsw")
    with pytest.raises(ValueError, match="use_gpu"):
        build_index(gallery, use_gpu="yes")
    with pytest.raises(ValueError, match="block has dim 8"):
        search_blocked(queries, [(0, gallery[:, :8])], 3)
    with pytest.raises(ValueError, match="no gallery rows"):
        search_blocked(queries, [], 3)
    with pytest.raises(ValueError, match="gallery has dim"):
        brute_force_search(queries, gallery[:, :8], 3)


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU error")
def test_use_gpu_true_without_gpu_raises(data):
    with pytest.raises(ValueError, match="use_gpu=True but no GPU"):
        build_index(data[0], use_gpu=True)
    assert build_index(data[0], use_gpu="auto").on_gpu is False


def test_threads_setting_applies():
    before = faiss.omp_get_max_threads()
    try:
        build_index(unit(10, 4), use_gpu=False, threads=1)
        assert faiss.omp_get_max_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            build_index(unit(10, 4), use_gpu=False, threads=0)
    finally:
        faiss.omp_set_num_threads(before)


def test_wrapping_a_raw_faiss_index():
    gallery = unit(50, 8)
    raw = faiss.IndexFlatIP(8)
    raw.add(gallery)
    s, i = SearchIndex(raw).search(gallery[:3], 1)
    assert i[:, 0].tolist() == [0, 1, 2]
    np.testing.assert_allclose(s[:, 0], 1.0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA GPU")
def test_gpu_sharded_search_equals_cpu():
    gallery = unit(20000, 64, seed=0)
    queries = unit(500, 64, seed=1)
    cpu = build_index(gallery, use_gpu=False)
    gpu = build_index(gallery, use_gpu=True)
    assert gpu.on_gpu and gpu.ntotal == 20000
    assert_same_topk(*gpu.search(queries, 50), *cpu.search(queries, 50), atol=1e-4)
    with pytest.raises(ValueError, match="GPU limit"):
        gpu.search(queries, GPU_MAX_K + 1)
    ivf_gpu = build_index(gallery, "ivf", nlist=64, nprobe=64, use_gpu=True)
    assert_same_topk(*ivf_gpu.search(queries, 10), *cpu.search(queries, 10), atol=1e-4)


def test_search_bench_smoke():
    from distcl.bench.search import format_search_bench, run_search_bench

    res = run_search_bench(
        n_gallery=3000,
        dim=16,
        n_queries=40,
        k=5,
        numpy_queries=10,
        nlist=16,
        chunk_queries=20,
    )
    assert res["check_distcl_vs_raw_recall"] == 1.0
    assert res["check_numpy_vs_distcl_recall"] == 1.0
    assert res["numpy"]["queries"] == 10
    assert 0.0 < res["ivf_recall"] <= 1.0 and res["ivf"]["nlist"] == 16
    for key in ("distcl_vs_raw_faiss", "distcl_vs_numpy", "ivf_speedup_vs_flat"):
        assert res[key] > 0
    assert "distcl flat (exact)" in format_search_bench(res)
    assert run_search_bench(n_gallery=200, dim=8, n_queries=5, ivf=False)["ivf_recall"] is None

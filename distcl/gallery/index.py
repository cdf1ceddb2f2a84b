"""Gallery search behind a small interface: exact inner-product search by default, faiss inside.

``build_index(gallery_emb)`` returns a ``SearchIndex`` (faiss ``IndexFlatIP``; ``kind="ivf"``
for an ``IndexIVFFlat`` approximate index with its recall measured by the caller). Ids are row
positions in add order. Embeddings are compared by inner product (= cosine for L2-normalised
rows, docs/design.md). Compatibility metrics must use exact search: ANN recall noise would
confound cross-model comparisons; IVF is for serving-scale galleries.

- CPU: all cores unless ``threads`` says otherwise (Ray workers start with OMP_NUM_THREADS=1).
- GPU (faiss-gpu installed and a GPU visible): the index is sharded over all GPUs with
  ``index_cpu_to_all_gpus(..., GpuMultipleClonerOptions(shard=True))``; k <= 2048 there.
- Galleries larger than memory: ``search_blocked`` streams (offset, block) pairs, e.g. from
  ``distcl.gallery.store.iter_embedding_batches``, and keeps the global top-k.
- ``brute_force_search`` is the numpy reference the tests compare faiss against.

``k`` larger than the number of gallery rows is clamped: results have ``min(k, ntotal)``
columns. IVF may return fewer than k hits when the probed lists hold fewer vectors; those
slots have id -1 and score -3.4e38 (faiss's convention).

Test: ``.venv/bin/python -m pytest tests/test_index.py -q`` (GPU tests: ``-m gpu``).
Benchmark: ``python -m distcl.bench.search``.
"""

from __future__ import annotations

import math
import os
import warnings

try:
    import faiss
except ImportError as e:  # faiss comes from an extra: one of faiss-cpu / faiss-gpu
    raise ImportError(
        "faiss is not installed: pip install 'distcl[cpu]' (faiss-cpu) or 'distcl[gpu]'"
    ) from e
import numpy as np

GPU_MAX_K = 2048  # faiss GPU limit for k and nprobe
DEFAULT_QUERY_BATCH = 16384
_KINDS = ("flat", "ivf")

__all__ = [
    "GPU_MAX_K",
    "SearchIndex",
    "build_index",
    "gpu_available",
    "brute_force_search",
    "recall_at_k_vs_exact",
]


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_matrix(x: object, name: str) -> np.ndarray:
    """(N, d) float32 C-contiguous copy-if-needed of ``x``; ValueError naming ``name``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[1] < 1:
        raise ValueError(f"{name} must have d >= 1 columns")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def _set_threads(threads: int | None) -> int:
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    n = threads or os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    return n


class SearchIndex:
    """A faiss index plus the bookkeeping distcl needs: dimension checks, k clamping, GPU
    limits and query batching (so result and scratch memory stay bounded).

    Build it with ``build_index``; wrapping an existing faiss index directly also works.
    """

    def __init__(
        self,
        index: faiss.Index,
        *,
        kind: str = "flat",
        on_gpu: bool = False,
        threads: int | None = None,
        query_batch: int = DEFAULT_QUERY_BATCH,
    ) -> None:
        if isinstance(query_batch, bool) or not isinstance(query_batch, int) or query_batch < 1:
            raise ValueError(f"query_batch must be a positive int, got {query_batch!r}")
        self.index = index
        self.kind = kind
        self.on_gpu = on_gpu
        self.threads = threads
        self.query_batch = query_batch

    @property
    def ntotal(self) -> int:
        """Number of gallery vectors in the index."""
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self.index.d)

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"SearchIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal}, {where})"

    def add(self, embeddings: np.ndarray) -> None:
        """Append gallery rows ``embeddings`` (N, d); they get ids ntotal .. ntotal+N-1."""
        emb = _as_matrix(embeddings, "embeddings")
        if emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {emb.shape[1]}, index has dim {self.dim}")
        if emb.shape[0]:
            self.index.add(emb)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product for each query row.

        ``queries`` (Q, d) (converted to float32). Returns ``scores`` (Q, k') float32, best
        first, and ``ids`` (Q, k') int64 with k' = min(k, ntotal). Queries are searched in
        blocks of ``query_batch`` rows.
        """
        q = _as_matrix(queries, "queries")  # (Q, d)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, index has dim {self.dim}")
        k = _check_k(k)
        if self.ntotal == 0:
            raise ValueError("cannot search an empty index (ntotal == 0)")
        k_eff = min(k, self.ntotal)
        if self.on_gpu and k_eff > GPU_MAX_K:
            raise ValueError(
                f"k={k_eff} exceeds the faiss GPU limit of {GPU_MAX_K}; "
                "use build_index(..., use_gpu=False) for larger k"
            )
        _set_threads(self.threads)
        nq = q.shape[0]
        scores = np.empty((nq, k_eff), np.float32)  # (Q, k')
        ids = np.empty((nq, k_eff), np.int64)  # (Q, k')
        for start in range(0, nq, self.query_batch):
            stop = min(start + self.query_batch, nq)
            scores[start:stop], ids[start:stop] = self.index.search(q[start:stop], k_eff)
        return scores, ids


def _resolve_gpu(use_gpu: object) -> bool:
    if use_gpu == "auto":
        return gpu_available()
    if use_gpu is True:
        if not gpu_available():
            raise ValueError(
                "use_gpu=True but no GPU is usable: this faiss build has no GPU support or "
                "faiss.get_num_gpus() == 0 (install faiss-gpu, or pass use_gpu='auto'/False)"
            )
        return True
    if use_gpu is False:
        return False
    raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")


def default_nlist(n: int) -> int:
    """IVF list count ~ 4 sqrt(N), kept <= N/39 so k-means has enough points per centroid."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 16,
    use_gpu: bool | str = "auto",
    threads: int | None = None,
    query_batch: int = DEFAULT_QUERY_BATCH,
    train_size: int | None = None,
    seed: int = 0,
    gpu_float16: bool = False,
) -> SearchIndex:
    """Build an inner-product index over gallery ``embeddings`` (N, d).

    ``kind="flat"``: exact search (``IndexFlatIP``). ``kind="ivf"``: ``IndexIVFFlat`` with
    ``nlist`` lists (default ``default_nlist(N)``) trained by k-means on a seeded sample of
    ``train_size`` rows (default min(N, 64 * nlist)), searched with ``nprobe`` lists.
    ``use_gpu``: "auto" uses every visible GPU (index sharded over them), True requires one,
    False stays on CPU. ``threads``: faiss OpenMP threads (default: all cores).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    emb = _as_matrix(embeddings, "embeddings")  # (N, d)
    n, d = emb.shape
    on_gpu = _resolve_gpu(use_gpu)
    _set_threads(threads)

    if kind == "flat":
        cpu_index: faiss.Index = faiss.IndexFlatIP(d)
        nprobe_eff = None
    else:
        if n < 1:
            raise ValueError("kind='ivf' needs at least one embedding to train on")
        nlist = default_nlist(n) if nlist is None else nlist
        if isinstance(nlist, bool) or not isinstance(nlist, int) or not 1 <= nlist <= n:
            raise ValueError(f"nlist must be an int in [1, N={n}], got {nlist!r}")
        if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(f"nprobe must be a positive int, got {nprobe!r}")
        nprobe_eff = min(nprobe, nlist)
        if on_gpu and nprobe_eff > GPU_MAX_K:
            warnings.warn(
                f"nprobe={nprobe_eff} capped to the faiss GPU limit {GPU_MAX_K}", stacklevel=2
            )
            nprobe_eff = GPU_MAX_K
        n_train = min(n, train_size if train_size is not None else 64 * nlist)
        if n_train < nlist:
            raise ValueError(f"train_size={n_train} must be >= nlist={nlist}")
        rng = np.random.default_rng(seed)
        sample = emb if n_train == n else emb[np.sort(rng.choice(n, n_train, replace=False))]
        quantizer = faiss.IndexFlatIP(d)
        cpu_index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        cpu_index.cp.seed = seed
        # k-means would otherwise subsample (and warn) past 256 points per centroid
        cpu_index.cp.max_points_per_centroid = max(256, -(-n_train // nlist))
        cpu_index.train(sample)  # sample: (n_train, d)
        cpu_index.nprobe = nprobe_eff

    if on_gpu:
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True  # split the gallery over GPUs; each GPU searches its shard
        co.useFloat16 = gpu_float16
        index = faiss.index_cpu_to_all_gpus(cpu_index, co=co)
        if nprobe_eff is not None:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe_eff)
    else:
        index = cpu_index
    out = SearchIndex(index, kind=kind, on_gpu=on_gpu, threads=threads, query_batch=query_batch)
    out.add(emb)  # added after the GPU copy so host memory holds the gallery only once
    return out


def brute_force_search(
    queries: np.ndarray, gallery: np.ndarray, k: int, *, query_batch: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Numpy reference for exact inner-product top-``k``: matmul + argpartition per query block.

    Ties are broken by lower gallery index. Returns ``scores`` (Q, k') float32 and ``ids``
    (Q, k') int64, k' = min(k, G). ``query_batch`` defaults to keep each (B, G) similarity
    block under ~256 MB.
    """
    q = _as_matrix(queries, "queries")  # (Q, d)
    g = _as_matrix(gallery, "gallery")  # (G, d)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]}, gallery has dim {g.shape[1]}")
    k = _check_k(k)
    nq, ng = q.shape[0], g.shape[0]
    if ng == 0:
        raise ValueError("gallery is empty")
    k_eff = min(k, ng)
    if query_batch is None:
        query_batch = max(1, min(4096, (64 << 20) // ng))
    scores = np.empty((nq, k_eff), np.float32)
    ids = np.empty((nq, k_eff), np.int64)
    for start in range(0, nq, query_batch):
        stop = min(start + query_batch, nq)
        sims = q[start:stop] @ g.T  # (B, G)
        if k_eff < ng:
            top = np.argpartition(sims, ng - k_eff, axis=1)[:, ng - k_eff :]  # (B, k'), unordered
        else:
            top = np.broadcast_to(np.arange(ng), sims.shape)
        top_s = np.take_along_axis(sims, top, axis=1)  # (B, k')
        order = np.lexsort((top, -top_s), axis=1)  # by score desc, then index asc
        top = np.take_along_axis(top, order, axis=1)
        top_s = np.take_along_axis(top_s, order, axis=1)
        if k_eff < ng:
            # argpartition picks arbitrarily among values equal to the k-th score: redo those
            # rows with a stable full sort so the lowest indices win.
            kth = top_s[:, -1:]  # (B, 1)
            for r in np.flatnonzero((sims >= kth).sum(axis=1) > k_eff):
                full = np.argsort(-sims[r], kind="stable")[:k_eff]
                top[r], top_s[r] = full, sims[r, full]
        scores[start:stop], ids[start:stop] = top_s, top
    return scores, ids


def recall_at_k_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """k-recall@k of an approximate search: mean over queries of |approx[:k] & exact[:k]| / k.

    Both (Q, >= k) int arrays of gallery ids; id -1 (missing hit) never counts. In [0, 1].
    """
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    k = _check_k(k)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(
            f"approx_ids and exact_ids must be 2-D with equal rows, got {a.shape}, {e.shape}"
        )
    if a.shape[1] < k or e.shape[1] < k:
        raise ValueError(f"k={k} exceeds the columns of approx_ids {a.shape} / exact_ids {e.shape}")
    nq = a.shape[0]
    if nq == 0:
        raise ValueError("approx_ids has no queries")
    a, e = a[:, :k], e[:, :k]
    hits = 0
    step = max(1, (1 << 24) // (k * k))  # bound the (B, k, k) comparison tensor
    for s in range(0, nq, step):
        ab, eb = a[s : s + step], e[s : s + step]
        match = (ab[:, :, None] == eb[:, None, :]).any(axis=2) & (ab >= 0)  # (B, k)
        hits += int(match.sum())
    return hits / (nq * k)

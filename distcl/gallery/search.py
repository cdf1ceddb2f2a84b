"""Streamed top-k search of several query sets against one gallery fed in blocks (docs/design.md).

    search = StreamSearch([QuerySet(q1, k=11), QuerySet(q2, k=11, allowed=seen)], dim=128)
    for emb, labels in gallery_blocks:        # (B, d) float32, (B,): one block in memory
        search.add(emb, labels)
    (scores1, rows1), (scores2, rows2) = search.results()   # (Q, k) best first, global rows

Rows are gallery positions in add order (-1: no hit). One pass over the gallery serves every
query set: this is how the evaluation searches all query models i >= j against gallery model j
reading it once. ``allowed`` restricts a query set to gallery rows whose label is in it (the
``seen`` protocol) without a second pass.

- ``kind="flat"``: exact. Each block is searched at once (``faiss.knn``, BLAS) and the top-k
  lists are merged with ``faiss.ResultHeap``; on GPUs (``use_gpu``) each block goes to a flat
  index sharded over all GPUs (``distcl.gallery.index.build_index``). Nothing but the current
  block and the heaps is held.
- ``kind="ivf"`` / ``"ivfpq"``: approximate, for serving-scale galleries. ``train(sample)``
  first, then ``add`` stores the (compressed) rows in the index and, for a seeded sample of
  each query set's queries, runs the exact search too, so ``recall()`` reports the ANN's
  k-recall@k against exact search. CPU only.

Test: ``.venv/bin/python -m pytest tests/test_eval_engine.py -q``
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from distcl.gallery.index import build_index, default_nlist, recall_at_k_vs_exact

KINDS = ("flat", "ivf", "ivfpq")
RECALL_SAMPLE = 256  # queries per query set whose ANN lists are checked against exact search


@dataclass
class QuerySet:
    """Queries (Q, d) float32 searched for their ``k`` best gallery rows; ``allowed``: only
    gallery rows whose label is in it (None: every row)."""

    emb: np.ndarray
    k: int
    allowed: np.ndarray | None = None


def _heap_result(heap: faiss.ResultHeap, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of a heap fed with every block, best first; missing slots: I = -1."""
    heap.finalize()
    ids = np.ascontiguousarray(heap.I[:, :k])
    scores = np.where(ids >= 0, heap.D[:, :k], -np.inf).astype(np.float32)
    return scores, ids


class StreamSearch:
    """Top-k lists of several query sets against one gallery added block by block."""

    def __init__(
        self,
        queries: list[QuerySet],
        dim: int,
        *,
        kind: str = "flat",
        use_gpu: bool = False,
        nlist: int | None = None,
        nprobe: int = 16,
        pq_m: int | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"eval.index must be one of {KINDS}, got {kind!r}")
        for q in queries:
            if q.emb.ndim != 2 or q.emb.shape[1] != dim or q.k < 1:
                raise ValueError(f"query set of shape {q.emb.shape}, k={q.k} for dim {dim}")
        self.queries, self.dim, self.kind, self.use_gpu = queries, dim, kind, use_gpu
        self.nlist, self.nprobe, self.pq_m, self.seed = nlist, nprobe, pq_m, seed
        self.rows = 0  # gallery rows added so far
        rng = np.random.default_rng(seed)
        # exact heaps: every query for flat, a seeded sample for the ANN recall check
        self.sample = [
            np.arange(len(q.emb))
            if kind == "flat"
            else np.sort(rng.permutation(len(q.emb))[:RECALL_SAMPLE])
            for q in queries
        ]
        self.heaps = [
            faiss.ResultHeap(len(s), q.k, keep_max=True)
            for s, q in zip(self.sample, queries, strict=True)
        ]
        self._exact: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._ann: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.index: faiss.Index | None = None
        self.labels: list[np.ndarray] = []  # ANN: labels of the added rows (for ``allowed``)

    # ------------------------------------------------------------------ ANN index
    def train(self, sample: np.ndarray, n_total: int) -> None:
        """Train the IVF (-PQ) index on ``sample`` (S, d); ``n_total`` rows will be added."""
        if self.kind == "flat":
            return
        nlist = self.nlist or default_nlist(n_total)
        nlist = max(1, min(nlist, len(sample)))
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = self.pq_m or next(m for m in (self.dim // 4, 32, 16, 8, 4, 2, 1)
                                  if m >= 1 and self.dim % m == 0)  # fmt: skip
            nbits = 8 if len(sample) >= 256 * 39 else 4  # PQ k-means needs points per centroid
            index = faiss.IndexIVFPQ(
                quantizer, self.dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT
            )
        index.cp.seed = self.seed
        index.cp.max_points_per_centroid = max(256, -(-len(sample) // nlist))
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = min(self.nprobe, nlist)
        self.index = index

    # ------------------------------------------------------------------ blocks
    def add(self, emb: np.ndarray, labels: np.ndarray) -> None:
        """Add gallery rows ``emb`` (B, d) float32 with ``labels`` (B,); they get the next
        B global row ids."""
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(labels) != len(emb):
            raise ValueError(f"block of shape {emb.shape} with {len(labels)} labels")
        if len(emb) == 0:
            return
        if self.kind != "flat":
            if self.index is None:
                raise ValueError("train() the ANN index before adding rows")
            self.index.add(emb)
            self.labels.append(np.asarray(labels))
        gpu_index = None
        for q, rows, heap in zip(self.queries, self.sample, self.heaps, strict=True):
            sel = None if q.allowed is None else np.flatnonzero(np.isin(labels, q.allowed))
            block = emb if sel is None else emb[sel]  # (B', d)
            if len(block) == 0 or len(rows) == 0:
                continue
            k = min(q.k, len(block))
            qe = q.emb if len(rows) == len(q.emb) else q.emb[rows]
            if self.use_gpu and self.kind == "flat":
                if sel is None and gpu_index is None:  # one GPU copy serves every full set
                    gpu_index = build_index(emb, "flat", use_gpu=True)
                index = gpu_index if sel is None else build_index(block, "flat", use_gpu=True)
                scores, ids = index.search(qe, k)  # (Q, k)
            else:
                scores, ids = faiss.knn(qe, block, k, metric=faiss.METRIC_INNER_PRODUCT)
            ids = ids if sel is None else np.where(ids >= 0, sel[np.maximum(ids, 0)], -1)
            heap.add_result(scores, np.where(ids >= 0, ids + self.rows, -1))
        self.rows += len(emb)

    def results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query set: (scores (Q, k') float32 best first, rows (Q, k') int64, -1 = none),
        k' = the set's k."""
        if self.kind == "flat":
            return self._exact_results()
        if self._ann is not None:
            return self._ann
        if self.index is None:  # never trained: no gallery row
            return [(np.full((len(q.emb), q.k), -np.inf, np.float32),
                     np.full((len(q.emb), q.k), -1, np.int64)) for q in self.queries]  # fmt: skip
        out = []
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        for q in self.queries:
            params = faiss.SearchParametersIVF(nprobe=self.index.nprobe)
            if q.allowed is not None:
                ok = np.flatnonzero(np.isin(labels, q.allowed)).astype(np.int64)
                params.sel = faiss.IDSelectorBatch(ok)  # kept alive by ``params``
            scores, ids = self.index.search(np.ascontiguousarray(q.emb), q.k, params=params)
            out.append((np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids))
        self._ann = out
        return out

    def _exact_results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._exact is None:  # a heap is finalised once
            self._exact = [
                _heap_result(h, q.k) for h, q in zip(self.heaps, self.queries, strict=True)
            ]
        return self._exact

    def exact_sample(self) -> list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
        """Per query set: (the positions of its sampled queries, their exact (scores, rows)),
        for a recall computed after merging several shards' lists."""
        return list(zip(self.sample, self._exact_results(), strict=True))

    def recall(self, k: int) -> list[float | None]:
        """ANN only: per query set, k-recall@k of its lists against exact search on a seeded
        sample of its queries (None for flat search, which is exact)."""
        if self.kind == "flat":
            return [None] * len(self.queries)
        approx = self.results()
        out: list[float | None] = []
        for (_, ids), rows, (_, exact), q in zip(
            approx, self.sample, self._exact_results(), self.queries, strict=True
        ):
            kk = min(k, q.k, self.rows)
            out.append(recall_at_k_vs_exact(ids[rows], exact, kk) if len(rows) and kk else None)
        return out


def merge_topk(
    lists: list[tuple[np.ndarray, np.ndarray]], sizes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k lists of consecutive gallery shards merged into lists over all of them.

    ``lists[s]`` = (scores (Q, k) best first, rows (Q, k), -1 = none) of shard s, its rows
    local to it; ``sizes[s]`` its row count. Shard s's rows become ``offset_s + row`` (offset:
    the rows of the shards before it), the order one pass over the shards reads them. Merged
    with ``faiss.ResultHeap`` shard by shard; returns (scores, rows) as ``StreamSearch``.
    """
    nq, k = lists[0][0].shape
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    offset = 0
    for (scores, rows), n in zip(lists, sizes, strict=True):
        if scores.shape != (nq, k) or rows.shape != (nq, k):
            raise ValueError(f"shard lists of shapes {scores.shape}, {rows.shape}; want {(nq, k)}")
        heap.add_result(scores, np.where(rows >= 0, rows + offset, -1))
        offset += n
    return _heap_result(heap, k)

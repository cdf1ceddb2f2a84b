"""Reference implementations the tests check distcl against (not used by distcl itself).

- :func:`grow_matrix` / :func:`score_run`: a compatibility matrix grown row by row from
  embeddings held in memory (the tuning scorer's reference);
- :func:`topk_summary`: CMC / Recall@K / mAP@k from one faiss top-k search;
- :func:`search_blocked`: exact top-k over a gallery streamed in blocks (faiss's
  ``ResultHeap``), the reference of the engine's streamed search.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from distcl import storage
from distcl.config import TuneConfig
from distcl.eval import protocols as pr
from distcl.gallery.index import _as_matrix, _check_k, _set_threads
from distcl.rundir import RunDir
from distcl.tune.space import objective


def _pair_metric(q_emb: np.ndarray, g_emb: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """metric(queries embedded by one model, gallery by another), the same items both sides."""
    from distcl.eval.metrics import retrieval_summary

    if metric == "map":
        ks = (1,)
    elif metric.split("@")[0] in ("cmc", "recall") and metric.split("@")[-1].isdigit():
        ks = (int(metric.split("@")[1]),)
    else:
        raise ValueError(f"eval.metric: {metric!r} is not one of 'map', 'cmc@K', 'recall@K'")
    out = retrieval_summary(q_emb, labels, g_emb, labels, exclude_self=True, topk=ks,
                            recall_ks=ks)  # fmt: skip
    return float(out[metric])


def grow_matrix(
    M: np.ndarray,
    embs: Sequence[np.ndarray],
    labels: np.ndarray,
    masks: Sequence[np.ndarray] | None,
    metric: str,
) -> np.ndarray:
    """The (T, T) compatibility matrix of ``embs`` (T models) given the rows already in
    ``M`` ((R, R), R <= T): only rows R..T-1 are computed. Same values as
    ``distcl.eval.compat.compatibility_matrix(embs, labels, metric, True, masks)``.

    M[i][j], j <= i: queries embedded by model i, gallery by model j, on the items of
    ``masks[j]`` (the classes model j had seen) or on all items when ``masks`` is None.
    """
    T, R = len(embs), M.shape[0]
    if R > T or M.shape != (R, R):
        raise ValueError(f"M must be (R, R) with R <= {T}, got {M.shape}")
    out = np.full((T, T), np.nan)
    out[:R, :R] = M
    for i in range(R, T):
        for j in range(i + 1):
            mask = slice(None) if masks is None else masks[j]
            out[i, j] = _pair_metric(embs[i][mask], embs[j][mask], labels[mask], metric)
    return out


def score_run(
    run_dir: str | Path, tc: TuneConfig, tasks: int, M: np.ndarray | None = None
) -> tuple[dict[str, float], np.ndarray]:
    """Score the first ``tasks`` models of a run dir for tuning: (metrics, matrix).

    ``M``: the matrix of an earlier call (its rows are reused). Metrics: ``task``, the
    compatibility scores ``ac`` (NaN for one model), ``am``, ``bc``, ``fc`` and the
    ``objective`` of ``tc``.
    """
    from distcl.eval import compat

    rd = RunDir(run_dir)
    job, scenario = rd.load_job(), rd.load_scenario()
    _ids, labels, embs = _load_eval_embeddings(run_dir, tasks, job.eval.items_per_class, job.seed)
    masks = None
    if tc.protocol == "seen":
        masks = [np.isin(labels, scenario.tasks[t].seen_classes) for t in range(tasks)]
    M = grow_matrix(np.zeros((0, 0)) if M is None else M, embs, labels, masks, job.eval.metric)
    s = compat.summarize(M)
    metrics = {"task": tasks, **{k: float(s[k]) for k in ("ac", "am", "bc", "fc")}}
    metrics["objective"] = objective(metrics["ac"], metrics["am"], tc.objective, tc.ac_floor)
    return metrics, M


def _load_eval_embeddings(run_dir: str | Path, T: int, items_per_class: int | None, seed: int):
    """(ids, labels, [emb_t for t < T]) of the closed-set evaluation items (task >= 0),
    aligned by id across models, in memory (small runs: tuning, scripts)."""
    from distcl.gallery.store import read_embeddings

    root = storage.join(run_dir, "eval", "embeddings")
    embs, ids, labels = [], None, None
    for t in range(T):
        g = read_embeddings(root, models=[t])
        keep = g.tasks >= 0
        order = np.argsort(g.item_ids[keep].astype(str), kind="stable")
        g_ids = g.item_ids[keep][order].astype(str)
        if ids is None:
            ids, labels = g_ids, g.labels[keep][order]
        elif not np.array_equal(ids, g_ids):
            raise ValueError(f"{root}: model {t} embedded a different evaluation set")
        embs.append(g.embeddings[keep][order])
    mask = pr.closed_subset(labels, np.ones(len(labels), bool), items_per_class, seed)
    return ids[mask], labels[mask], [e[mask] for e in embs]


def topk_summary(
    query_emb, query_ids, query_lab, index, gallery_ids, gallery_lab, ks=(1, 5, 10)
) -> dict:
    """CMC/Recall@K and mAP@k from one faiss top-k search (self matches dropped by id)."""
    from distcl.eval.metrics import topk_counts

    kmax = max(ks)
    scores, nn = index.search(query_emb, kmax + 1)  # (Q, k+1): one spare for the self match
    drop = (nn < 0) | (np.asarray(gallery_ids)[np.maximum(nn, 0)] == np.asarray(query_ids)[:, None])
    order = np.argsort(drop, axis=1, kind="stable")
    scores = np.take_along_axis(np.where(drop, -np.inf, scores), order, 1)[:, :kmax]
    nn = np.take_along_axis(np.where(drop, -1, nn), order, 1)[:, :kmax]
    same = (np.asarray(gallery_lab)[np.maximum(nn, 0)] == np.asarray(query_lab)[:, None]) & (
        nn >= 0
    )
    g_ids = set(np.asarray(gallery_ids).tolist())
    classes, counts = np.unique(gallery_lab, return_counts=True)
    pos = np.searchsorted(classes, query_lab)
    n_pos = counts[pos] - np.array([q in g_ids for q in np.asarray(query_ids).tolist()])
    hits, ap, n = topk_counts(scores, same, n_pos, ks, map_k=kmax)
    out = {f"cmc@{k}": float(h) / n for k, h in zip(ks, hits, strict=True)}
    out.update({f"recall@{k}": out[f"cmc@{k}"] for k in ks})
    out[f"map@{kmax}"] = ap / n
    return out


def search_blocked(
    queries: np.ndarray,
    gallery_blocks: Iterable[tuple[int, np.ndarray]],
    k: int,
    *,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` over a gallery streamed as ``(offset, block)`` pairs.

    ``block`` (B, d) holds gallery rows ``offset .. offset+B-1``; only one block is in memory
    at a time. Returns ``scores`` (Q, k') float32 best first and ``ids`` (Q, k') int64 global
    row ids, k' = min(k, rows seen). Equals flat search up to ties.
    """
    q = _as_matrix(queries, "queries")  # (Q, d)
    k = _check_k(k)
    _set_threads(threads)
    nq, d = q.shape
    heap = faiss.ResultHeap(nq, k, keep_max=True)  # running global top-k per query
    total = 0
    for i, item in enumerate(gallery_blocks):
        try:
            offset, block = item
        except (TypeError, ValueError) as e:
            raise ValueError(f"gallery_blocks[{i}] must be an (offset, block) pair") from e
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"gallery_blocks[{i}] offset must be a non-negative int")
        b = _as_matrix(block, f"gallery_blocks[{i}] block")  # (B, d)
        if b.shape[1] != d:
            raise ValueError(f"gallery_blocks[{i}] block has dim {b.shape[1]}, queries have {d}")
        if b.shape[0] == 0:
            continue
        k_b = min(k, b.shape[0])
        scores_b, ids_b = faiss.knn(q, b, k_b, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, k_b)
        heap.add_result(scores_b, ids_b + int(offset))
        total += b.shape[0]
    if total == 0:
        raise ValueError("gallery_blocks yielded no gallery rows")
    heap.finalize()
    k_eff = min(k, total)
    return np.ascontiguousarray(heap.D[:, :k_eff]), np.ascontiguousarray(heap.I[:, :k_eff])

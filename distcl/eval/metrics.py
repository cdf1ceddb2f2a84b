"""Retrieval and verification metrics: CMC top-k, Recall@K, mAP, TAR@FAR (docs/design.md).

Pure numpy (torch tensors are accepted and converted); no faiss, Ray or file I/O, so these are
the brute-force reference that the faiss-backed gallery code is tested against.

Conventions shared by every function here:
- Embeddings are compared by inner product (they are L2-normalised upstream, so this is
  cosine similarity); a higher score is a better match.
- Similarities are computed block by block over the queries (`similarity_blocks`), so a
  50k x 50k evaluation never holds more than one (block, G) float32 matrix at a time.
- Only queries with at least one positive (same label) in the gallery count; the others are
  left out of every mean. If no query has a positive, a ValueError is raised.
- `exclude_self=True` means query set and gallery set are the same items in the same order
  (possibly embedded by different models): query r never sees gallery row r.
- Ties are ranked pessimistically: a negative whose score equals the best positive's score
  ranks ahead of it. A collapsed model (all embeddings equal) therefore scores low instead of
  winning by luck of the sort order. mAP groups ties exactly like sklearn.
- Results are Python floats, fractions in [0, 1].

Test: `.venv/bin/python -m pytest tests/test_metrics.py -q`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Elements per similarity block: bounds the memory of the sort buffers (a handful of
# (block, G) arrays of 4-8 bytes each, so about 200 MB at this budget).
_BLOCK_ELEMENTS = 1 << 22


def _as_numpy(x: Any) -> np.ndarray:
    """Return `x` as a numpy array; torch tensors are detached and moved to CPU.

    Duck-typed so this module never imports torch. Low-precision float tensors (half,
    bfloat16) are widened to float32 because numpy cannot hold bfloat16.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_embeddings(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    # float32 like the similarity blocks; no copy when the input already is float32.
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_labels(x: Any, name: str, n: int, emb_name: str) -> np.ndarray:
    arr = _as_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} labels but {emb_name} has {n} rows")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    out = tuple(ks)
    if not out:
        raise ValueError(f"{name} must name at least one k")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must hold positive integers, got {k!r}")
    return tuple(int(k) for k in out)


def _check_pair(
    q_emb: Any, q_lab: Any, g_emb: Any, g_lab: Any, exclude_self: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q = _check_embeddings(q_emb, "q_emb")
    g = _check_embeddings(g_emb, "g_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_emb has dim {q.shape[1]} but g_emb has dim {g.shape[1]}")
    ql = _check_labels(q_lab, "q_lab", q.shape[0], "q_emb")
    gl = _check_labels(g_lab, "g_lab", g.shape[0], "g_emb")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(
            f"exclude_self=True needs the same items on both sides, but q_emb has "
            f"{q.shape[0]} rows and g_emb has {g.shape[0]}"
        )
    return q, ql, g, gl


def _blocks(q: np.ndarray, g: np.ndarray, block: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, q.shape[0], block):
        sims = q[start : start + block] @ g.T  # (b, G) float32
        if not np.isfinite(sims).all():
            raise ValueError("similarities overflow float32: are q_emb and g_emb normalised?")
        yield start, sims


def similarity_blocks(
    q_emb: Any, g_emb: Any, block: int = 4096
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start, sims)` over blocks of queries, `sims = q_emb[start:start+b] @ g_emb.T`.

    `sims` is a fresh (b, G) float32 array (b <= block), so callers may modify it. Inputs are
    validated before the first block is produced (this function is not itself a generator).
    """
    q = _check_embeddings(q_emb, "q_emb")
    g = _check_embeddings(g_emb, "g_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_emb has dim {q.shape[1]} but g_emb has dim {g.shape[1]}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    return _blocks(q, g, int(block))


def _precision_sums(scores: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Per row, the sum over positives of the precision at the end of the positive's tie group.

    scores: (b, G) float, same: (b, G) bool. Returns (b,) float64. sklearn's AP = sum_n (R_n -
    R_{n-1}) P_n over distinct thresholds, with all items tied at a threshold entering
    together; equivalently each positive contributes P at the end of its tie group, divided
    by the number of positives (the caller divides). One sort, no loops.
    """
    b, n = scores.shape
    order = np.argsort(scores, axis=1)[:, ::-1]  # (b, G) indices, descending score
    s_sorted = np.take_along_axis(scores, order, axis=1)  # (b, G)
    y_sorted = np.take_along_axis(same, order, axis=1)  # (b, G) bool
    tp = np.cumsum(y_sorted, axis=1)  # (b, G) true positives among the top n+1
    is_end = np.ones((b, n), dtype=bool)  # last position of each tie group
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    # Index of the end of each position's tie group: the nearest end at or after it.
    end = np.where(is_end, np.arange(n), n - 1)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]  # (b, G)
    precision_at_end = np.take_along_axis(tp, end, axis=1) / (end + 1.0)  # (b, G) float64
    return np.where(y_sorted, precision_at_end, 0.0).sum(axis=1)


def _average_precision_rows(scores: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Per-row AP like sklearn's `average_precision_score`, vectorised over rows.

    scores: (b, G) float; same: (b, G) bool, every row with >= 1 True. Returns (b,) float64.
    """
    return _precision_sums(scores, same) / same.sum(axis=1)


def _scores_and_same(scores: Any, same: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (scores float64 (P,), same bool (P,)) of a 1-D scoring."""
    s = _as_numpy(scores)
    y = _as_numpy(same)
    if s.ndim != 1 or s.shape[0] == 0:
        raise ValueError(f"scores must be 1-D and non-empty, got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"same has shape {y.shape} but scores has shape {s.shape}")
    s = np.asarray(s, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contains NaN or inf")
    return s, _as_bool(y, "same")


def average_precision(scores: Any, same: Any) -> float:
    """Average precision of one query, equal to sklearn's `average_precision_score(same, scores)`.

    scores: (G,) similarity of each gallery item (higher is better); same: (G,) bool, True
    where the item is a correct match. Tied scores share one threshold (sklearn's rule).
    Raises ValueError if `same` has no True entry (AP is undefined then).
    """
    s, y = _scores_and_same(scores, same)
    if not y.any():
        raise ValueError("same has no positive: average precision is undefined")
    return float(_average_precision_rows(s[None, :], y[None, :])[0])


def _as_bool(y: np.ndarray, name: str) -> np.ndarray:
    if y.dtype == bool:
        return y
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1), got values outside {{0, 1}}")
    return y.astype(bool)


def _auto_block(n_gallery: int) -> int:
    return max(1, min(4096, _BLOCK_ELEMENTS // n_gallery))


def block_counts(
    sims: np.ndarray, same: np.ndarray, ks: np.ndarray, with_map: bool
) -> tuple[np.ndarray, float, int]:
    """Counts of one block of full rankings: (hits per k (K,), sum of AP, queries counted).

    sims: (b, G) float32 similarities (an excluded gallery row is -inf and not in `same`),
    same: (b, G) bool, ks: (K,) int. Rows without a positive are skipped. Pessimistic ties:
    rank of the first match = 1 + #(negatives with score >= the best positive's score).
    """
    valid = same.any(axis=1)  # (b,) queries with >= 1 positive
    if not valid.all():
        sims, same = sims[valid], same[valid]
    if sims.shape[0] == 0:
        return np.zeros(len(ks), np.int64), 0.0, 0
    best_pos = np.where(same, sims, -np.inf).max(axis=1)  # (b,)
    rank = 1 + ((sims >= best_pos[:, None]) & ~same).sum(axis=1)  # (b,)
    hits = (rank[:, None] <= np.asarray(ks)[None, :]).sum(axis=0)  # (K,)
    ap = float(_average_precision_rows(sims, same).sum()) if with_map else 0.0
    return hits, ap, int(sims.shape[0])


def _scan(
    q_emb: Any,
    q_lab: Any,
    g_emb: Any,
    g_lab: Any,
    *,
    exclude_self: bool,
    ks: tuple[int, ...],
    with_map: bool,
    block: int | None,
) -> tuple[dict[int, float], float, int]:
    """One pass over the similarity blocks. Returns ({k: hit fraction}, mAP or nan, n_valid)."""
    q, ql, g, gl = _check_pair(q_emb, q_lab, g_emb, g_lab, exclude_self)
    if block is None:
        block = _auto_block(g.shape[0])
    elif isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    k_arr = np.asarray(ks)  # (K,)
    hits = np.zeros(len(ks), dtype=np.int64)
    ap_sum = 0.0
    n_valid = 0
    for start, sims in _blocks(q, g, int(block)):
        b = sims.shape[0]
        same = ql[start : start + b, None] == gl[None, :]  # (b, G) bool
        if exclude_self:
            rows = np.arange(b)
            # The own row becomes a negative at -inf: it ranks last and never counts ahead of
            # a (finite) positive, nor changes the precision at any positive.
            same[rows, start + rows] = False
            sims[rows, start + rows] = -np.inf
        block_hits, block_ap, block_valid = block_counts(sims, same, k_arr, with_map)
        hits += block_hits
        ap_sum += block_ap
        n_valid += block_valid
    if n_valid == 0:
        raise ValueError("no query has a positive (same label) in the gallery")
    fractions = {k: float(h) / n_valid for k, h in zip(ks, hits, strict=True)}
    return fractions, (ap_sum / n_valid if with_map else float("nan")), n_valid


def cmc(
    q_emb: Any,
    q_lab: Any,
    g_emb: Any,
    g_lab: Any,
    topk: Sequence[int] = (1, 5),
    exclude_self: bool = False,
    *,
    block: int | None = None,
) -> dict[int, float]:
    """CMC top-k: fraction of queries whose first correct match is at rank <= k.

    q_emb: (Q, D), q_lab: (Q,), g_emb: (G, D), g_lab: (G,). Queries without a positive in
    the gallery (after exclusion) are left out. `exclude_self=True`: query and gallery are the
    same items in the same order (embeddings may come from different models); query r's own
    gallery row r is excluded; Q must equal G.

    Tie rule (pessimistic): rank of the first match = 1 + #(negatives with score >= the best
    positive's score). `block`: queries per similarity block (default: memory-bounded).
    Returns {k: fraction}.
    """
    ks = _check_ks(topk, "topk")
    fractions, _, _ = _scan(
        q_emb, q_lab, g_emb, g_lab, exclude_self=exclude_self, ks=ks, with_map=False, block=block
    )
    return fractions


def recall_at_k(
    q_emb: Any,
    q_lab: Any,
    g_emb: Any,
    g_lab: Any,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    *,
    block: int | None = None,
) -> dict[int, float]:
    """Recall@K (CVS's AR@K): fraction of queries with a correct label among the K nearest.

    Same inputs, exclusion and pessimistic tie rule as `cmc`; "a correct label among the K
    nearest" is "first correct match at rank <= K", so the two coincide value for value.
    Returns {k: fraction}.
    """
    _check_ks(ks, "ks")  # name the argument of this function in errors
    return cmc(q_emb, q_lab, g_emb, g_lab, topk=ks, exclude_self=exclude_self, block=block)


def mean_average_precision(
    q_emb: Any,
    q_lab: Any,
    g_emb: Any,
    g_lab: Any,
    exclude_self: bool = False,
    *,
    block: int | None = None,
) -> float:
    """mAP: mean over queries (with >= 1 positive) of the AP of the ranked gallery.

    Each query's AP equals sklearn's `average_precision_score(same_label, scores)` (ties share
    a threshold). Exclusion as in `cmc`.
    """
    _, m_ap, _ = _scan(
        q_emb, q_lab, g_emb, g_lab, exclude_self=exclude_self, ks=(1,), with_map=True, block=block
    )
    return m_ap


def retrieval_summary(
    q_emb: Any,
    q_lab: Any,
    g_emb: Any,
    g_lab: Any,
    exclude_self: bool = False,
    topk: Sequence[int] = (1, 5),
    recall_ks: Sequence[int] = (1, 5, 10),
    *,
    block: int | None = None,
) -> dict[str, float]:
    """CMC, mAP and Recall@K in one pass over the similarity blocks (one sort per block).

    Returns {"cmc@k": ..., "map": ..., "recall@k": ..., "n_queries": number of queries that
    had a positive and were counted (int)}. Definitions, exclusion and tie rule as in `cmc`
    and `mean_average_precision`.
    """
    topk = _check_ks(topk, "topk")
    recall_ks = _check_ks(recall_ks, "recall_ks")
    ks = tuple(sorted(set(topk) | set(recall_ks)))
    fractions, m_ap, n_valid = _scan(
        q_emb, q_lab, g_emb, g_lab, exclude_self=exclude_self, ks=ks, with_map=True, block=block
    )
    out: dict[str, float] = {f"cmc@{k}": fractions[k] for k in topk}
    out["map"] = m_ap
    out.update({f"recall@{k}": fractions[k] for k in recall_ks})
    out["n_queries"] = n_valid
    return out


def tar_at_far(
    scores: Any, same: Any, fars: Sequence[float] = (1e-4, 1e-3, 1e-2)
) -> dict[float, float]:
    """TAR at target FARs from the ROC of 1:1 pair scores (a pair is accepted if score >= t).

    scores: (P,) pair similarity; same: (P,) bool, True for genuine pairs. For each target
    FAR f, returns the TAR at the threshold whose FAR is the largest not above f (the best TAR
    among thresholds with FAR <= f). If only accepting nothing has FAR <= f (the top-scoring
    pair is an impostor and f is below 1/#impostors), the TAR is 0.0. Needs >= 1 genuine and
    >= 1 impostor pair. Returns {f: TAR}.
    """
    s, y = _scores_and_same(scores, same)
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"same needs genuine and impostor pairs, got {n_pos} and {n_neg}")
    targets = tuple(fars)
    for f in targets:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"fars must lie in (0, 1], got {f!r}")

    order = np.argsort(s)[::-1]  # (P,) descending score
    s_sorted = s[order]
    y_sorted = y[order]
    is_end = np.ones(s.shape[0], dtype=bool)  # one ROC point per distinct threshold
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    tpr = np.cumsum(y_sorted)[is_end] / n_pos  # (n_thresholds,) non-decreasing
    fpr = np.cumsum(~y_sorted)[is_end] / n_neg  # (n_thresholds,) non-decreasing
    out: dict[float, float] = {}
    for f in targets:
        # Accepting nothing (FAR 0, TAR 0) is always allowed; fpr is sorted, so the last
        # point with fpr <= f has the largest such FAR and the best TAR at it.
        n_ok = int(np.searchsorted(fpr, float(f), side="right"))
        out[f] = float(tpr[n_ok - 1]) if n_ok > 0 else 0.0
    return out


def topk_counts(
    nn_scores: Any, nn_same: Any, n_pos: Any, ks: Sequence[int], map_k: int | None = None
) -> tuple[np.ndarray, float, int]:
    """Counts from top-k lists: (hits per k (K,), sum of AP@map_k, queries counted).

    nn_scores: (Q, L) float, each row sorted best first (a missing slot is -inf); nn_same:
    (Q, L) bool, True where the neighbour has the query's label; n_pos: (Q,) int, the
    positives of each query in the whole gallery (self excluded). Queries with n_pos == 0
    are not counted. CMC: the rank of the first match is pessimistic within the list (1 +
    #negatives in the list scoring >= it); no match in the list means rank > L, so k <= L is
    required. AP@K = sum over the first K positions of precision at each positive (tie
    groups as in sklearn) / min(n_pos, K); with K >= G it is the exact AP.
    """
    s = np.asarray(_as_numpy(nn_scores), dtype=np.float64)  # (Q, L)
    y = _as_bool(np.asarray(_as_numpy(nn_same)), "nn_same")  # (Q, L)
    npos = np.asarray(_as_numpy(n_pos))  # (Q,)
    if s.ndim != 2 or y.shape != s.shape or npos.shape != (s.shape[0],):
        raise ValueError(f"nn_scores {s.shape}, nn_same {y.shape}, n_pos {npos.shape} disagree")
    ks = _check_ks(ks, "ks")
    if max(ks) > s.shape[1] or (map_k is not None and map_k > s.shape[1]):
        raise ValueError(f"lists of length {s.shape[1]} cannot give k={max(ks)} / map_k={map_k}")
    keep = npos > 0
    s, y, npos = s[keep], y[keep], npos[keep]
    best = np.where(y, s, -np.inf).max(axis=1, initial=-np.inf)  # (Q,) first match's score
    found = y.any(axis=1)
    rank = np.where(found, 1 + ((s >= best[:, None]) & ~y).sum(axis=1), s.shape[1] + 1)
    hits = (rank[:, None] <= np.asarray(ks)[None, :]).sum(axis=0)  # (K,)
    ap = 0.0
    if map_k is not None and s.shape[0]:
        sums = _precision_sums(s[:, :map_k], y[:, :map_k])  # (Q,)
        ap = float((sums / np.minimum(npos, map_k)).sum())
    return hits, ap, int(s.shape[0])


def verification_accuracy(scores: Any, same: Any, folds: int = 10) -> float:
    """1:1 verification accuracy with the threshold chosen by cross-validation (LFW protocol).

    scores: (P,) pair similarity; same: (P,) bool, True for genuine pairs. The pairs, in the
    given order, are cut into `folds` contiguous folds of near-equal size (the first P % folds
    folds one pair longer, as sklearn's `KFold(folds, shuffle=False)`). For each fold the
    threshold is the candidate (each distinct score of the other folds) with the best accuracy
    on the other folds, predicting "same" iff score >= threshold (the smallest such candidate
    on ties); the fold's accuracy is measured at that threshold. Returns the mean over folds.
    """
    s, y = _scores_and_same(scores, same)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if s.shape[0] < folds:
        raise ValueError(f"{s.shape[0]} pairs cannot be cut into {folds} folds")
    sizes = np.full(folds, s.shape[0] // folds)
    sizes[: s.shape[0] % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    accs = []
    for f in range(folds):
        test = np.zeros(s.shape[0], bool)
        test[bounds[f] : bounds[f + 1]] = True
        train_s, train_y = s[~test], y[~test]
        cand = np.unique(train_s)  # (m,) ascending distinct scores
        pos = np.sort(train_s[train_y])
        neg = np.sort(train_s[~train_y])
        # accepted genuine (score >= c) + rejected impostors (score < c), per candidate c
        correct = (len(pos) - np.searchsorted(pos, cand, "left")) + np.searchsorted(neg, cand)
        thr = cand[int(np.argmax(correct))]  # argmax: first, i.e. smallest, best candidate
        accs.append(float(((s[test] >= thr) == y[test]).mean()))
    return float(np.mean(accs))


def class_templates(g_emb: Any, g_lab: Any) -> tuple[np.ndarray, np.ndarray]:
    """One template per class: the mean of its L2-normalised embeddings, re-normalised.

    g_emb: (G, D), g_lab: (G,). Returns (classes (C,) sorted, templates (C, D) float32).
    Sums run in float64 (`template_sums` gives the same from streamed batches).
    """
    g = _check_embeddings(g_emb, "g_emb")
    gl = _check_labels(g_lab, "g_lab", g.shape[0], "g_emb")
    classes, inverse = np.unique(gl, return_inverse=True)
    sums = np.zeros((len(classes), g.shape[1]), np.float64)  # (C, D)
    np.add.at(sums, inverse, normalize_rows(g))
    return classes, templates_from_sums(sums)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) float64 rows divided by their L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    return x / np.where(norms > 0, norms, 1.0)


def templates_from_sums(sums: np.ndarray) -> np.ndarray:
    """(C, D) float32 templates from per-class sums of normalised embeddings."""
    return normalize_rows(sums).astype(np.float32)


def template_cmc_counts(
    q_emb: Any, q_lab: Any, templates: Any, classes: Any, ks: Sequence[int]
) -> tuple[np.ndarray, int]:
    """(hits per k (K,), queries counted) of queries ranking class templates (C, D) by inner
    product. Queries whose class has no template are not counted. A tie ranks the wrong class
    first: rank = 1 + #(other templates scoring >= the correct one)."""
    q = _check_embeddings(q_emb, "q_emb")
    ql = _check_labels(q_lab, "q_lab", q.shape[0], "q_emb")
    t = _check_embeddings(templates, "templates")
    tc = _check_labels(classes, "classes", t.shape[0], "templates")
    ks = _check_ks(ks, "topk")
    hits, n = np.zeros(len(ks), np.int64), 0
    for start, sims in _blocks(q, t, _auto_block(t.shape[0])):
        same = ql[start : start + sims.shape[0], None] == tc[None, :]  # (b, C)
        block_hits, _, block_n = block_counts(sims, same, np.asarray(ks), False)
        hits, n = hits + block_hits, n + block_n
    return hits, n


def template_identification(
    q_emb: Any, q_lab: Any, g_emb: Any, g_lab: Any, topk: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Identification against class templates: CMC@k of each query ranking the templates.

    The gallery (G, D) is reduced to one template per class (`class_templates`); each query
    (Q, D) ranks the templates by inner product; a tie ranks the wrong class first. Queries
    whose class has no template are left out (ValueError if none is left). Returns {k: CMC@k}.
    """
    ks = _check_ks(topk, "topk")
    classes, templates = class_templates(g_emb, g_lab)
    hits, n = template_cmc_counts(q_emb, q_lab, templates, classes, ks)
    if n == 0:
        raise ValueError("no query's class has a template in the gallery")
    return {k: float(h) / n for k, h in zip(ks, hits, strict=True)}


# ---------------------------------------------------------------- open-set 1:N identification
def best_scores(
    q_emb: Any, q_lab: Any, g_emb: Any, g_lab: Any, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Per probe (Q,): the best score of a gallery row of its label (``pos``) and of any other
    row (``neg``), -inf where there is none. Rows labelled -1 (distractors) are always
    negatives. What 1:N identification needs from a gallery, and additive over gallery shards
    by ``np.maximum``."""
    q = _check_embeddings(q_emb, "q_emb")
    g = _check_embeddings(g_emb, "g_emb")
    ql = _check_labels(q_lab, "q_lab", q.shape[0], "q_emb")
    gl = _check_labels(g_lab, "g_lab", g.shape[0], "g_emb")
    pos = np.full(len(q), -np.inf, np.float32)
    neg = np.full(len(q), -np.inf, np.float32)
    if len(g) == 0:
        return pos, neg
    for start, sims in similarity_blocks(q, g, block):
        same = ql[start : start + len(sims), None] == gl[None, :]  # (b, G)
        pos[start : start + len(sims)] = np.where(same, sims, -np.inf).max(1)
        neg[start : start + len(sims)] = np.where(same, -np.inf, sims).max(1)
    return pos, neg


def tpir_from_best(
    pos: np.ndarray, neg: np.ndarray, mated: np.ndarray, fpirs: Sequence[float]
) -> dict[str, float]:
    """TPIR at each FPIR and rank-1 (docs/metrics.md, docs/metrics.md) from the best scores of
    every probe (:func:`best_scores`): ``mated`` (Q,) bool, probes whose class is enrolled.

    A probe's top-1 score is max(pos, neg); a mated probe is identified at rank 1 when its
    best same-class score beats every other row (pos > neg: a tie is a miss). For FPIR f:
    k = floor(f N_nonmated), the threshold t is the (k+1)-th largest non-mated top-1 score
    (-inf when k = N_nonmated); TPIR(f) = share of mated probes identified at rank 1 with a
    top-1 score > t. An FPIR below 1 / N_nonmated cannot be measured: NaN (not a number a
    user could read as a result). ``rank1``: the share identified at rank 1 (t = -inf).
    Returns {"tpir@fpir=<f>": ..., "rank1": ...}."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    mated = np.asarray(mated, bool)
    if not mated.any():
        raise ValueError("open-set identification needs mated probes (enrolled classes)")
    top = np.maximum(pos, neg)
    hit = (pos > neg)[mated]
    nonmated = np.sort(top[~mated])[::-1]  # descending
    out = {"rank1": float(hit.mean())}
    for f in fpirs:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"fpirs must lie in (0, 1], got {f!r}")
        k = int(np.floor(float(f) * len(nonmated) + 1e-9))
        if k < 1:  # no threshold reaches this FPIR with so few non-mated probes
            out[fpir_name(f)] = float("nan")
            continue
        t = nonmated[k] if k < len(nonmated) else -np.inf
        out[fpir_name(f)] = float((hit & (top[mated] > t)).mean())
    return out


def fpir_name(fpir: float) -> str:
    """The matrix name of TPIR at ``fpir``: 1e-2 -> "tpir@fpir=1e-2"."""
    mantissa, exp = f"{fpir:.0e}".split("e")
    return f"tpir@fpir={mantissa}e{int(exp)}"


def open_set_identification(
    probes: Any, probe_lab: Any, gallery: Any, gallery_lab: Any,
    fpir: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> dict[float, float]:  # fmt: skip
    """TPIR at each FPIR of an open-set 1:N search (docs/metrics.md): probes of classes present
    in ``gallery`` are mated, the others non-mated; gallery rows labelled -1 are distractors.
    Returns {fpir: TPIR} (NaN where the FPIR is below 1 / N_nonmated)."""
    pos, neg = best_scores(probes, probe_lab, gallery, gallery_lab)
    mated = np.isin(_as_numpy(probe_lab), _as_numpy(gallery_lab))
    res = tpir_from_best(pos, neg, mated, fpir)
    return {f: res[fpir_name(f)] for f in fpir}

"""Backfilling curves (FCT / FastFill): retrieval quality as a growing share of the gallery
is re-embedded by the new model, in the order a policy gives. Pure numpy.

    out = backfill_curve(q_new, g_old, g_new, labels, order, steps=20)
    out["fractions"]  # i / (K + 1), i = 0 .. K + 1 (K = steps)
    out["values"]     # CMC@1 (leave-one-out, pessimistic ties) at each step
    out["auc"]        # the plain mean of the K + 2 values (not a trapezoid)
    out["map@100"], out["auc_map@100"]

Definition (docs/metrics.md): queries are embedded by the new model; the gallery starts as
the old model's rows. At step i the first ``floor(i n / (K + 1))`` items of ``order`` hold
their new rows (or a transformation's output), the others their old rows.

How it is computed without a gallery per step (the same code serves the in-memory function
and the streamed passes of ``distcl.eval.backfill_run``): item p of the order is new from
step ``first_new(p)`` on. Its scores go into the bucket of that step: a *new* row counts at
every step >= its bucket, an *old* row at every step < its bucket. Per query and bucket the
accumulator keeps the best positive and the best negative score (and, for mAP@k, the k best
scores), fed by gallery rows in any order and in blocks; at the end a running maximum over
the buckets gives every step's best positive and negative from the new rows (steps from the
left) and the old rows (from the right). CMC@1 hits when the best positive beats every
negative (a tie is a miss, as everywhere in distcl).

Policies (an order of the gallery's items, first = re-embedded first): :func:`order_random`
(seeded), :func:`order_oldest` (rows of the oldest model first), :func:`order_distance` (an
oracle: largest ||new - old|| first, it needs both rows), :func:`order_class_mean` (the old
row farthest from its class mean in the old gallery first), :func:`order_uncertainty`
(largest predicted sigma first, FastFill).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distcl.eval import metrics as mt

POLICIES = ("random", "oldest", "distance", "class_mean", "uncertainty")
MAP_K = 100


def step_cuts(n: int, steps: int) -> np.ndarray:
    """(K + 2,) int64: how many items of the order hold new rows at step i = 0 .. K + 1."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    i = np.arange(steps + 2, dtype=np.int64)
    return (i * n) // (steps + 1)


def first_new_step(positions: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """For items at ``positions`` of the order: the first step at which they hold new rows
    (the smallest i with cuts[i] > position)."""
    return np.searchsorted(cuts, positions, side="right").astype(np.int64)


@dataclass
class BackfillAccumulator:
    """Per query and bucket (a step): best positive, best negative and, optionally, the
    ``map_k`` best scores with their relevance, of the new rows and of the old rows seen so
    far. Feed gallery blocks with :meth:`add`, in any order; read :meth:`result`.

    Queries: labels ``q_lab`` (Q,) and ``q_self`` (Q,) the gallery code of each query's own
    item (-1: none), excluded from its gallery (leave-one-out). A block's columns are
    grouped by (bucket, label) and reduced to one maximum per group (``np.maximum.reduceat``):
    a query's best positive in a bucket is its own label's group, its best negative the best
    group of another label (the best two groups of the bucket suffice).
    """

    q_lab: np.ndarray
    q_self: np.ndarray
    cuts: np.ndarray
    n_pos: np.ndarray  # (Q,) positives of each query in the gallery, its own item excluded
    map_k: int | None = MAP_K
    best: dict = field(default_factory=dict)  # (side, kind) -> (Q, S) float32
    top: dict = field(default_factory=dict)  # side -> list over buckets of (scores, same)

    def __post_init__(self) -> None:
        q, s = len(self.q_lab), len(self.cuts)
        self.q_lab = np.asarray(self.q_lab)
        self.q_self = np.asarray(self.q_self, np.int64)
        # Queries grouped by label: the queries of class c are q_sorted[q_start[c]:][:q_count[c]].
        self._classes, q_cls = np.unique(self.q_lab, return_inverse=True)
        self._q_sorted = np.argsort(q_cls, kind="stable")
        self._q_count = np.bincount(q_cls, minlength=len(self._classes))
        self._q_start = np.cumsum(self._q_count) - self._q_count
        self._self_query = {int(c): i for i, c in enumerate(self.q_self) if c >= 0}
        for side in ("new", "old"):
            for kind in ("pos", "neg"):
                self.best[(side, kind)] = np.full((q, s), -np.inf, np.float32)
            if self.map_k:
                self.top[side] = [
                    (np.full((q, 0), -np.inf, np.float32), np.zeros((q, 0), bool)) for _ in range(s)
                ]

    def _positives(self, g_lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query, column) pair of a block with equal labels: (query idx, column idx),
        Q R / C pairs for C classes, never a (Q, R) mask."""
        cls = np.searchsorted(self._classes, g_lab)
        ok = cls < len(self._classes)
        ok[ok] = self._classes[cls[ok]] == g_lab[ok]
        cnt = np.where(ok, self._q_count[np.minimum(cls, len(self._classes) - 1)], 0)
        total = int(cnt.sum())
        cols = np.repeat(np.arange(len(g_lab)), cnt)
        within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        first = np.repeat(self._q_start[np.minimum(cls, len(self._classes) - 1)], cnt)
        return self._q_sorted[first + within], cols

    def add(self, side: str, scores: np.ndarray, g_lab: np.ndarray, g_code: np.ndarray,
            g_bucket: np.ndarray) -> None:  # fmt: skip
        """A block of gallery rows of ``side`` ("new" or "old"): ``scores`` (Q, R) of the
        queries against them (modified here), their labels, gallery codes and buckets (R,).
        Rows already sorted by bucket (``np.argsort(g_bucket, kind="stable")`` before the
        scores are computed) save a copy of the scores."""
        g_lab, g_code = np.asarray(g_lab), np.asarray(g_code)
        g_bucket = np.asarray(g_bucket)
        if len(g_bucket) > 1 and (np.diff(g_bucket) < 0).any():
            perm = np.argsort(g_bucket, kind="stable")
            scores, g_lab, g_code, g_bucket = (
                scores[:, perm],
                g_lab[perm],
                g_code[perm],
                g_bucket[perm],
            )
        scores = np.asarray(scores, np.float32)
        if self._self_query:  # leave-one-out: a query's own item is not in its gallery
            own = [(self._self_query[c], j) for j, c in enumerate(g_code.tolist())
                   if c in self._self_query]  # fmt: skip
            if own:
                q_idx, cols = np.array(own).T
                scores[q_idx, cols] = -np.inf
        if self.map_k:  # before the positives are blanked below
            self._add_top(side, scores, g_lab, g_bucket)
        seg = np.flatnonzero(np.r_[True, g_bucket[1:] != g_bucket[:-1]])  # (B,) bucket starts
        buckets = g_bucket[seg]
        q_idx, cols = self._positives(g_lab)
        pos = np.full((len(scores), len(seg)), -np.inf, np.float32)  # (Q, B)
        np.maximum.at(pos, (q_idx, np.searchsorted(seg, cols, side="right") - 1),
                      scores[q_idx, cols])  # fmt: skip
        scores[q_idx, cols] = -np.inf  # what is left in each bucket: the negatives
        neg = np.maximum.reduceat(scores, seg, axis=1)  # (Q, B)
        for kind, vals in (("pos", pos), ("neg", neg)):
            cur = self.best[(side, kind)]
            cur[:, buckets] = np.maximum(cur[:, buckets], vals)

    def merge(self, other: BackfillAccumulator) -> BackfillAccumulator:
        """Fold in ``other`` (the same queries, fed another shard of the gallery)."""
        for key, cur in self.best.items():
            np.maximum(cur, other.best[key], out=cur)
        for side, lists in self.top.items():
            self.top[side] = [
                _keep_top(np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1),
                          self.map_k)
                for a, b in zip(lists, other.top[side], strict=True)
            ]  # fmt: skip
        return self

    def _add_top(self, side: str, scores, g_lab, g_bucket) -> None:
        same = self.q_lab[:, None] == g_lab[None, :]  # (Q, R)
        for u in np.unique(g_bucket):
            cols = g_bucket == u
            s_old, r_old = self.top[side][u]
            s_all = np.concatenate([s_old, scores[:, cols]], 1)
            r_all = np.concatenate([r_old, same[:, cols] & (scores[:, cols] > -np.inf)], 1)
            self.top[side][u] = _keep_top(s_all, r_all, self.map_k)

    def result(self) -> dict:
        """Per step: CMC@1 and (with ``map_k``) mAP@k over the queries with a positive."""
        new_pos = np.maximum.accumulate(self.best[("new", "pos")], axis=1)  # steps >= bucket
        new_neg = np.maximum.accumulate(self.best[("new", "neg")], axis=1)
        old_pos = _suffix_max_after(self.best[("old", "pos")])  # steps < bucket
        old_neg = _suffix_max_after(self.best[("old", "neg")])
        best_pos, best_neg = np.maximum(new_pos, old_pos), np.maximum(new_neg, old_neg)
        has = self.n_pos > 0
        n = int(has.sum())
        if n == 0:
            raise ValueError("no query has a positive (same label) in the gallery")
        hits = ((best_pos > best_neg) & has[:, None]).sum(0)  # (S,) a tie is a miss
        out = {"values": (hits / n).tolist(), "queries": n}
        if self.map_k:
            out[f"map@{self.map_k}"] = self._map(has, n)
        return out

    def _map(self, has: np.ndarray, n: int) -> list[float]:
        vals = []
        for i in range(len(self.cuts)):
            parts = [self.top["new"][u] for u in range(i + 1)]  # new rows of buckets <= i
            parts += [self.top["old"][u] for u in range(i + 1, len(self.cuts))]
            scores = np.concatenate([p[0] for p in parts], 1)
            same = np.concatenate([p[1] for p in parts], 1)
            scores, same = _keep_top(scores, same, self.map_k, sort=True)
            _, ap, _ = mt.topk_counts(scores[has], same[has], self.n_pos[has], [1],
                                      map_k=min(self.map_k, scores.shape[1]))  # fmt: skip
            vals.append(ap / n)
        return vals


def _suffix_max_after(a: np.ndarray) -> np.ndarray:
    """out[:, i] = max(a[:, i + 1:]) (-inf for the last column)."""
    rev = np.maximum.accumulate(a[:, ::-1], axis=1)[:, ::-1]  # max(a[:, i:])
    return np.concatenate([rev[:, 1:], np.full((len(a), 1), -np.inf, a.dtype)], 1)


def _keep_top(scores: np.ndarray, same: np.ndarray, k: int, sort: bool = False):
    """The k best columns of each row (sorted best first when ``sort``; at equal scores a
    non-match first: pessimistic)."""
    if scores.shape[1] > k:
        idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, same = np.take_along_axis(scores, idx, 1), np.take_along_axis(same, idx, 1)
    if sort:
        order = np.lexsort((same, -scores), axis=1) if scores.size else scores.astype(int)
        scores, same = np.take_along_axis(scores, order, 1), np.take_along_axis(same, order, 1)
    return scores, same


# ------------------------------------------------------------------ the curve in memory
def backfill_curve(
    q_new, g_old, g_new, labels, order, steps: int = 20, *, map_k: int | None = MAP_K,
    block: int = 4096,
) -> dict:  # fmt: skip
    """The backfilling curve of one (old, new) pair on N items that are both the queries
    and the gallery (leave-one-out): ``q_new`` (N, d) the queries by the new model, ``g_old``
    / ``g_new`` (N, d) the gallery rows before / after re-embedding (``g_new`` may be a
    transformation's output), ``labels`` (N,), ``order`` a permutation of 0..N-1 (first =
    re-embedded first). Returns ``fractions``, ``values`` (CMC@1), ``auc`` and, with
    ``map_k``, ``map@k`` and ``auc_map@k``."""
    q_new = mt._check_embeddings(q_new, "q_new")
    g_old = mt._check_embeddings(g_old, "g_old")
    g_new = mt._check_embeddings(g_new, "g_new")
    labels = np.asarray(mt._as_numpy(labels))
    order = np.asarray(mt._as_numpy(order), dtype=np.int64)
    n = len(labels)
    for name, a in (("q_new", q_new), ("g_old", g_old), ("g_new", g_new)):
        if len(a) != n:
            raise ValueError(f"{name} has {len(a)} rows, labels has {n}")
    if g_old.shape[1] != q_new.shape[1] or g_new.shape[1] != q_new.shape[1]:
        raise ValueError(
            f"dimensions differ: q_new {q_new.shape[1]}, g_old {g_old.shape[1]}, "
            f"g_new {g_new.shape[1]} (transform old rows to the new space first)"
        )
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError("order must be a permutation of 0 .. N - 1")
    cuts = step_cuts(n, steps)
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    bucket = first_new_step(position, cuts)  # (N,)
    codes = np.arange(n)
    n_pos = np.bincount(labels.astype(np.int64) - labels.min())[labels - labels.min()] - 1
    values, maps = [], []
    for start in range(0, n, block):
        rows = slice(start, start + block)
        acc = BackfillAccumulator(labels[rows], codes[rows], cuts, n_pos[rows], map_k)
        for side, g in (("new", g_new), ("old", g_old)):
            for g0 in range(0, n, block):
                cols = slice(g0, g0 + block)
                acc.add(side, q_new[rows] @ g[cols].T, labels[cols], codes[cols], bucket[cols])
        res = acc.result()
        values.append(np.asarray(res["values"]) * res["queries"])
        if map_k:
            maps.append(np.asarray(res[f"map@{map_k}"]) * res["queries"])
    total = int((n_pos > 0).sum())
    return curve_dict(cuts, n, np.sum(values, 0) / total,
                      np.sum(maps, 0) / total if map_k else None, map_k)  # fmt: skip


def curve_dict(cuts: np.ndarray, n: int, values, maps=None, map_k: int | None = MAP_K) -> dict:
    """The curve's dict: fractions i / (K + 1), values, their plain mean (``auc``)."""
    steps = len(cuts) - 2
    out = {"fractions": (np.arange(len(cuts)) / (steps + 1)).tolist(),
           "rows_new": cuts.tolist(), "items": n,
           "values": [float(v) for v in values], "auc": float(np.mean(values))}  # fmt: skip
    if maps is not None:
        out[f"map@{map_k}"] = [float(v) for v in maps]
        out[f"auc_map@{map_k}"] = float(np.mean(maps))
    return out


# ------------------------------------------------------------------ policies
def order_random(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of the gallery's items."""
    return np.random.default_rng([seed, 31]).permutation(n)


def _stable_desc(keys: np.ndarray, seed: int) -> np.ndarray:
    """Indices by ``keys`` descending, equal keys in a seeded random order."""
    tie = np.random.default_rng([seed, 37]).random(len(keys))
    return np.lexsort((tie, -np.asarray(keys, dtype=np.float64)))


def order_oldest(models: np.ndarray, tasks: np.ndarray | None = None, seed: int = 0):
    """Rows of the oldest model first; then the items that arrived earliest (``tasks``);
    remaining ties in a seeded random order."""
    tie = np.random.default_rng([seed, 37]).random(len(models))
    keys = (tie,) if tasks is None else (tie, np.asarray(tasks))
    return np.lexsort((*keys, np.asarray(models)))


def distance_keys(g_old: np.ndarray, g_new: np.ndarray) -> np.ndarray:
    """||new(x) - old(x)|| per item (N,): the oracle policy's key."""
    return np.linalg.norm(np.asarray(g_new, np.float64) - np.asarray(g_old, np.float64), axis=1)


def order_distance(g_old: np.ndarray, g_new: np.ndarray, seed: int = 0) -> np.ndarray:
    """Largest ||new(x) - old(x)|| first (an oracle: it needs both rows of every item)."""
    return _stable_desc(distance_keys(g_old, g_new), seed)


def class_mean_keys(g_old: np.ndarray, labels: np.ndarray, means: dict | None = None):
    """1 - cos(old row, the mean of its class's old rows) per item (N,); ``means``: the class
    means (label -> (d,)) when known (a streamed pass sums them first)."""
    g = np.asarray(g_old, np.float64)
    labels = np.asarray(labels)
    if means is None:
        means = {c: g[labels == c].mean(0) for c in np.unique(labels)}
    m = np.stack([means[c] for c in labels])  # (N, d)
    cos = (g * m).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(m, axis=1),
                                      1e-12)  # fmt: skip
    return 1.0 - cos


def order_class_mean(g_old: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """The old row farthest (cosine) from its class mean in the old gallery first."""
    return _stable_desc(class_mean_keys(g_old, labels), seed)


def order_uncertainty(sigma: np.ndarray, seed: int = 0) -> np.ndarray:
    """Largest predicted uncertainty first (FastFill: a transformation's sigma head)."""
    return _stable_desc(np.asarray(sigma).reshape(len(sigma), -1).mean(1), seed)


def check_policies(policies: Sequence[str], has_sigma: bool = False) -> list[str]:
    """``policies`` if each is known (and ``uncertainty`` only with a sigma head); else a
    ValueError naming the field."""
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"--policy: unknown policy {p!r} (known: {', '.join(POLICIES)})")
        if p == "uncertainty" and not has_sigma:
            raise ValueError("--policy: uncertainty needs a transformation with a sigma head "
                             "(method fct) and --transform")  # fmt: skip
    return list(policies)

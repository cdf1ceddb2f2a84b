"""Exemplar selection policies for the episodic memory (pure numpy: no Ray, no I/O).

Every policy returns indices in *priority order* (first = most important), so a memory that
must shrink when new classes arrive keeps the first ``m`` of each class (``shrink``):

- ``herding_order``: iCaRL herding on the old model's features (Rebuffi et al., 2017).
- ``random_order``: a seeded random permutation (random per class).
- ``select_exemplars``: one policy applied per class, seeded per (seed, class) so the choice
  for a class never depends on which other classes are present.
- ``per_class_budget``: the class-balanced budget (fixed per class, or total // classes).

Test: ``.venv/bin/python -m pytest tests/test_memory_selection.py -q``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

POLICIES = ("herding", "random")

_EPS = 1e-12


def herding_order(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL herding: indices of ``min(m, N)`` samples whose running mean tracks the class mean.

    Features are L2-normalised row-wise, ``mu`` is the mean of the normalised features, and
    step k picks the unused sample ``x`` minimising ``||mu - (sum_selected + x) / k||``.
    Ties go to the lowest index. Returns int64 indices into ``features``, no repeats.
    """
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {feats.shape}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    n = feats.shape[0]
    m = min(int(m), n)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), _EPS)  # (N, D)
    mu = feats.mean(axis=0) if n else np.zeros(feats.shape[1])  # (D,)
    running = np.zeros_like(mu)  # sum of the selected features, (D,)
    available = np.ones(n, dtype=bool)
    order = np.empty(m, dtype=np.int64)
    for k in range(1, m + 1):
        candidates = (running[None, :] + feats) / k  # (N, D): running mean if each were picked
        dist = np.linalg.norm(candidates - mu[None, :], axis=1)  # (N,)
        dist[~available] = np.inf  # no repeats
        pick = int(np.argmin(dist))
        order[k - 1] = pick
        available[pick] = False
        running += feats[pick]
    return order


def random_order(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``min(m, n)`` distinct indices of ``range(n)`` in random (priority) order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    return rng.permutation(n)[: min(m, n)].astype(np.int64)


def select_exemplars(
    labels: np.ndarray,
    features: np.ndarray | None,
    per_class: int,
    policy: str,
    seed: int,
) -> dict[int, np.ndarray]:
    """Choose up to ``per_class`` exemplars of each class; class -> indices in priority order.

    ``policy``: ``"herding"`` (needs ``features`` (N, D)) or ``"random"``. Randomness is
    seeded by ``(seed, class)``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if policy == "herding":
        if features is None:
            raise ValueError("features are required for policy='herding' (got None)")
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(
                f"features must be (N, D) with N={labels.shape[0]}, got shape {features.shape}"
            )
    out: dict[int, np.ndarray] = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)  # (N_c,) rows of class c, input order
        rng = np.random.default_rng([int(seed), int(c)])
        if policy == "herding":
            local = herding_order(features[idx], per_class)
        else:
            local = random_order(len(idx), per_class, rng)
        out[int(c)] = idx[local].astype(np.int64)
    return out


class BalancedSampler:
    """Class-balanced replay rows from ``labels`` (N,) sorted by class (the class layout is
    computed once; each ``sample`` is O(n)).

    Each of the K classes gets ``n // K`` rows and ``n % K`` random classes one more; rows are
    drawn without replacement within a class while it has enough, with replacement otherwise;
    the batch is shuffled. Empty ``labels`` or ``n == 0`` give no rows.
    """

    def __init__(self, labels: np.ndarray):
        labels = np.asarray(labels)
        if labels.ndim != 1 or np.any(labels[1:] < labels[:-1]):
            raise ValueError("labels must be 1-D and sorted by class")
        _classes, self.starts, self.counts = np.unique(
            labels, return_index=True, return_counts=True
        )

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        k = len(self.starts)
        if k == 0 or n == 0:
            return np.zeros(0, np.int64)
        quota = np.full(k, n // k)
        quota[rng.choice(k, n % k, replace=False)] += 1
        parts = [
            s + rng.choice(cnt, q, replace=bool(q > cnt))
            for s, cnt, q in zip(self.starts, self.counts, quota, strict=True)
            if q
        ]
        return rng.permutation(np.concatenate(parts)).astype(np.int64)


def balanced_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows (n,) of one class-balanced batch of ``labels`` sorted by class
    (:class:`BalancedSampler`)."""
    return BalancedSampler(labels).sample(n, rng)


def per_class_budget(n_classes: int, per_class: int | None, total: int | None) -> int:
    """Exemplars kept per class: ``per_class``, or ``total // n_classes`` (old classes shrink).

    With both set, the smaller wins. With ``total`` and no class yet, returns ``total``.
    """
    if n_classes < 0:
        raise ValueError(f"n_classes must be >= 0, got {n_classes}")
    if per_class is None and total is None:
        raise ValueError("set per_class or total (both are None)")
    if per_class is not None and per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if total is not None and total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    budgets = []
    if per_class is not None:
        budgets.append(int(per_class))
    if total is not None:
        budgets.append(int(total) // n_classes if n_classes else int(total))
    return min(budgets)


def shrink(
    order_by_class: Mapping[int, Sequence | np.ndarray], m: int
) -> dict[int, Sequence | np.ndarray]:
    """Keep the first ``m`` (highest-priority) entries of every class; returns a new dict."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    return {c: order[:m] for c, order in order_by_class.items()}

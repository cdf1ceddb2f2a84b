"""Compatibility matrix and the scores read from it: ECC, AC, AM, BC, FC (docs/design.md).

M is a (T, T) array with M[i][j] = a retrieval metric with queries embedded by model i and the
gallery by model j (0-indexed here; docs/metrics.md writes the same formulas 1-indexed). Only the
lower triangle including the diagonal is read; the upper triangle may hold NaN. The diagonal
is each model's self-test.

Pure numpy (the matrix builders call `distcl.eval.metrics`); no faiss, Ray or file I/O.
Test: `.venv/bin/python -m pytest tests/test_compat.py -q`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from distcl.eval.metrics import _as_numpy, _check_embeddings, _scan


def _check_matrix(M: Any) -> np.ndarray:
    m = np.asarray(_as_numpy(M), dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"M must be a non-empty square (T, T) matrix, got shape {m.shape}")
    if not np.isfinite(m[np.tril_indices(m.shape[0])]).all():
        raise ValueError("M has NaN or inf in its lower triangle (diagonal included)")
    return m


def _check_at_least_two(m: np.ndarray, what: str) -> int:
    t = m.shape[0]
    if t < 2:
        raise ValueError(f"{what} needs T >= 2 models, M is {t}x{t}")
    return t


TIES = ("strict", "pass", "ties_pass")


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return "pass" if ties == "ties_pass" else ties


def ecc_matrix(M: Any, ties: str = "strict") -> np.ndarray:
    """Empirical compatibility criterion per pair: (T, T) bool.

    True where j < i and M[i][j] > M[j][j] (`ties="strict"`, the default: a tie is NOT
    compatible) or M[i][j] >= M[j][j] (`ties="pass"`, also spelled "ties_pass" as in the
    config: CL2R's code counts a pair incompatible only when M[i][j] < M[j][j]). False on and
    above the diagonal.
    """
    rule = _check_ties(ties)
    m = _check_matrix(M)
    below = np.tril(np.ones(m.shape, dtype=bool), k=-1)  # (T, T) pairs j < i
    # Fill the (unused) upper triangle first so NaN there never reaches a comparison.
    lower = np.where(below, m, -np.inf)
    ref = np.diag(m)[None, :]
    return below & ((lower > ref) if rule == "strict" else (lower >= ref))


def average_compatibility(M: Any, ties: str = "strict") -> float:
    """AC = 2 / (T (T - 1)) * sum_{i > j} 1[pair (i, j) passes ECC]: the fraction of
    compatible pairs; `ties` as in `ecc_matrix`. Needs T >= 2 (ValueError otherwise).
    """
    m = _check_matrix(M)
    t = _check_at_least_two(m, "average_compatibility")
    return float(ecc_matrix(m, ties).sum()) * 2.0 / (t * (t - 1))


def average_multimodel_accuracy(M: Any, ignore_zeros: bool = False) -> float:
    """AM = 2 / (T (T + 1)) * sum_{j <= i} M[i][j]: the mean of the lower triangle.

    ``ignore_zeros``: the mean of its non-zero entries only, as iamcl2r's public code computes
    AM (it turns exact zeros into NaN so that its zero-filled upper triangle drops out; a
    lower-triangle entry of exactly 0 drops out with it). NaN when every entry is 0."""
    m = _check_matrix(M)
    t = m.shape[0]
    lower = m[np.tril_indices(t)]
    if ignore_zeros:
        lower = lower[lower != 0]
        return float(lower.mean()) if len(lower) else float("nan")
    return float(lower.sum()) * 2.0 / (t * (t + 1))


def backward_compatibility(M: Any) -> float:
    """BC = 1 / (T - 1) * sum_{i < T} (M[T][i] - M[i][i]) (1-indexed, as in docs/metrics.md).

    The last model's queries against each older gallery, minus that older model's self-test.
    Needs T >= 2.
    """
    m = _check_matrix(M)
    t = _check_at_least_two(m, "backward_compatibility")
    return float(np.mean(m[t - 1, : t - 1] - np.diag(m)[: t - 1]))


def forward_compatibility(M: Any) -> float:
    """FC = 1 / (T - 1) * sum_{i >= 2} (M[i][i-1] - M[i][i]) (1-indexed, as in docs/metrics.md).

    Each model's queries against the previous model's gallery, minus its own self-test.
    Needs T >= 2.
    """
    m = _check_matrix(M)
    t = _check_at_least_two(m, "forward_compatibility")
    idx = np.arange(1, t)
    return float(np.mean(m[idx, idx - 1] - m[idx, idx]))


def summarize(M: Any, ties: str = "strict", am_ignores_zeros: bool = False) -> dict[str, Any]:
    """All compatibility scores of M in a JSON-friendly dict.

    Keys: ac, am, bc, fc (floats; ac/bc/fc are NaN when T == 1, where they are undefined, so
    a one-task run still gets a report), ecc (list of lists of bool, see `ecc_matrix`),
    n_compatible (pairs passing ECC), n_pairs (T (T - 1) / 2), ties (the ECC tie rule).
    ``am_ignores_zeros``: AM as iamcl2r computes it (``average_multimodel_accuracy``).
    """
    m = np.asarray(_as_numpy(M), dtype=np.float64)
    t = m.shape[0] if m.ndim == 2 else 0
    if t and not np.isfinite(m[np.tril_indices(t)]).all():
        return _summarize_measurable(m, ties, am_ignores_zeros)
    m = _check_matrix(M)
    ecc = ecc_matrix(m, ties)
    nan = float("nan")
    return {
        "ac": average_compatibility(m, ties) if t >= 2 else nan,
        "am": average_multimodel_accuracy(m, am_ignores_zeros),
        "bc": backward_compatibility(m) if t >= 2 else nan,
        "fc": forward_compatibility(m) if t >= 2 else nan,
        "ecc": ecc.tolist(),
        "n_compatible": int(ecc.sum()),
        "n_pairs": t * (t - 1) // 2,
        "ties": _check_ties(ties),
    }


_METRIC_RE = re.compile(r"^(cmc|recall)@([1-9][0-9]*)$")


def _parse_metrics(metrics: Sequence[str]) -> tuple[tuple[int, ...], bool]:
    """Validate metric names; return the ks the scan needs and whether mAP is needed."""
    if isinstance(metrics, str) or len(metrics) == 0:
        raise ValueError(f"metrics must be a non-empty sequence of names, got {metrics!r}")
    ks: set[int] = set()
    with_map = False
    for name in metrics:
        match = _METRIC_RE.match(name) if isinstance(name, str) else None
        if name == "map":
            with_map = True
        elif match:
            ks.add(int(match.group(2)))
        else:
            raise ValueError(f"metric {name!r} is not one of 'map', 'cmc@K', 'recall@K'")
    return tuple(sorted(ks)) or (1,), with_map


def compatibility_matrices(
    embeddings: Sequence[Any],
    labels: Any,
    metrics: Sequence[str] = ("cmc@1", "map"),
    exclude_self: bool = True,
    seen_masks: Sequence[Any] | None = None,
    *,
    block: int | None = None,
) -> dict[str, np.ndarray]:
    """Compatibility matrices for several metrics in one pass over the model pairs.

    embeddings: T arrays (N, D_t): the same N evaluation items, in the same order, embedded
    once by each model t (T embedding passes, not T^2). labels: (N,). metrics: keys of
    `retrieval_summary` ("map", "cmc@K", "recall@K"). exclude_self: the items are both the
    queries and the gallery, so each query's own row is excluded (the usual protocol).

    M[i][j] = metric(queries embedded by model i, gallery embedded by model j) for j <= i;
    NaN above the diagonal.

    seen_masks: optional T boolean (N,) masks, mask j = items of the classes model j had seen
    (the `seen` protocol). Pair (i, j) then uses only the items in mask j, on both the query and
    the gallery side, so the diagonal M[j][j] is the reference R[j] = metric(model j, model j,
    mask j), and ECC/AC on this matrix compare M_seen[i][j] with M_seen[j][j], like with like.
    Without masks (the `all` protocol) every pair uses all N items.
    """
    ks, with_map = _parse_metrics(metrics)
    if len(embeddings) == 0:
        raise ValueError("embeddings must hold at least one model's (N, D) array")
    embs = [_check_embeddings(e, f"embeddings[{t}]") for t, e in enumerate(embeddings)]
    t_models = len(embs)
    n = embs[0].shape[0]
    for t, e in enumerate(embs):
        if e.shape[0] != n:
            raise ValueError(f"embeddings[{t}] has {e.shape[0]} rows, embeddings[0] has {n}")
    lab = _as_numpy(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    masks: list[np.ndarray | None] = [None] * t_models
    if seen_masks is not None:
        if len(seen_masks) != t_models:
            raise ValueError(f"seen_masks has {len(seen_masks)} masks for {t_models} models")
        masks = []
        for t, mk in enumerate(seen_masks):
            arr = _as_numpy(mk)
            if arr.dtype != bool or arr.shape != (n,):
                raise ValueError(
                    f"seen_masks[{t}] must be a bool array of shape ({n},), "
                    f"got {arr.dtype} {arr.shape}"
                )
            masks.append(arr)

    out = {name: np.full((t_models, t_models), np.nan) for name in metrics}
    for j in range(t_models):
        mask = masks[j]
        gallery = embs[j] if mask is None else embs[j][mask]
        lab_j = lab if mask is None else lab[mask]
        for i in range(j, t_models):
            queries = embs[i] if mask is None else embs[i][mask]
            fractions, m_ap, _ = _scan(
                queries,
                lab_j,
                gallery,
                lab_j,
                exclude_self=exclude_self,
                ks=ks,
                with_map=with_map,
                block=block,
            )
            for name in metrics:
                out[name][i, j] = m_ap if name == "map" else fractions[int(name.split("@")[1])]
    return out


def compatibility_matrix(
    embeddings: Sequence[Any],
    labels: Any,
    metric: str = "cmc@1",
    exclude_self: bool = True,
    seen_masks: Sequence[Any] | None = None,
    *,
    block: int | None = None,
) -> np.ndarray:
    """The (T, T) compatibility matrix of one metric; see `compatibility_matrices`."""
    return compatibility_matrices(
        embeddings, labels, (metric,), exclude_self, seen_masks, block=block
    )[metric]


def _summarize_measurable(m: np.ndarray, ties: str, am_ignores_zeros: bool) -> dict[str, Any]:
    """``summarize`` of a matrix with entries that could not be measured (NaN in the lower
    triangle: a cell whose queries had no positive in a small early gallery, a TPIR at an FPIR
    below 1 / N_nonmated): every score over the measurable entries only (AC over the pairs
    whose two entries are numbers; AM, BC, FC their means), NaN where none is; ``n_pairs``
    counts the measurable pairs, ``unmeasured`` the NaN entries."""
    rule = _check_ties(ties)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"M must be a non-empty square (T, T) matrix, got shape {m.shape}")
    t = m.shape[0]
    if np.isinf(m[np.tril_indices(t)]).any():
        raise ValueError("M has inf in its lower triangle (diagonal included)")
    nan = float("nan")
    diag = np.diag(m)
    below = np.tril(np.ones(m.shape, dtype=bool), k=-1)
    ok = below & np.isfinite(m) & np.isfinite(diag)[None, :]
    with np.errstate(invalid="ignore"):
        passes = (m > diag[None, :]) if rule == "strict" else (m >= diag[None, :])
    ecc = ok & passes
    lower = m[np.tril_indices(t)]
    lower = lower[np.isfinite(lower)]
    if am_ignores_zeros:
        lower = lower[lower != 0]

    def mean(x):
        x = x[np.isfinite(x)]
        return float(x.mean()) if len(x) else nan

    idx = np.arange(1, t)
    return {
        "ac": float(ecc.sum() / ok.sum()) if t >= 2 and ok.any() else nan,
        "am": float(lower.mean()) if len(lower) else nan,
        "bc": mean(m[t - 1, : t - 1] - diag[: t - 1]) if t >= 2 else nan,
        "fc": mean(m[idx, idx - 1] - m[idx, idx]) if t >= 2 else nan,
        "ecc": ecc.tolist(),
        "n_compatible": int(ecc.sum()),
        "n_pairs": int(ok.sum()),
        "ties": rule,
        "unmeasured": int((~np.isfinite(m[np.tril_indices(t)])).sum()),
    }

"""Tests of distcl.eval.metrics: golden hand-computed cases, sklearn and brute-force references.

Run: `.venv/bin/python -m pytest tests/test_metrics.py -q`.

Golden cases inject a hand-written similarity matrix S (Q x G) by passing q_emb = S and
g_emb = identity(G), so that q_emb @ g_emb.T == S exactly (integer scores, exact in float32).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_curve

from distcl.eval import metrics as mt
from distcl.eval.metrics import (
    average_precision,
    cmc,
    mean_average_precision,
    recall_at_k,
    retrieval_summary,
    similarity_blocks,
    tar_at_far,
    template_identification,
    topk_counts,
    verification_accuracy,
)

# ---------------------------------------------------------------- golden 5 queries x 8 gallery
G_LAB = np.array([0, 0, 1, 1, 2, 2, 3, 3])
Q_LAB = np.array([0, 1, 2, 4, 3])
S = np.array(
    [
        # q0, label 0: positives at 9 (rank 1) and 1 (rank 8). AP = (1/1 + 2/8) / 2 = 5/8.
        [9, 1, 8, 7, 2, 3, 4, 5],
        # q1, label 1: best positive 5 ties negative 5 -> rank 2. Thresholds 5: P=1/2, R=1/2;
        # 3: P=2/4, R=1. AP = 1/2 * 1/2 + 1/2 * 1/2 = 1/2.
        [5, 4, 5, 3, 2, 1, 0, 0],
        # q2, label 2: best positive 5 ties negative 5, four negatives above -> rank 6.
        # Thresholds 5: P=1/6, R=1/2; 1: P=2/7, R=1. AP = 1/12 + 1/7 = 19/84.
        [9, 8, 7, 6, 5, 1, 5, 0],
        # q3, label 4: no positive in the gallery -> left out of every metric.
        [1, 2, 3, 4, 5, 6, 7, 8],
        # q4, label 3: collapsed (all scores equal): all 6 negatives rank first -> rank 7.
        # One threshold: P=2/8, R=1. AP = 1/4.
        [3, 3, 3, 3, 3, 3, 3, 3],
    ],
    dtype=np.float32,
)
EYE8 = np.eye(8, dtype=np.float32)
GOLDEN_RANKS = np.array([1, 2, 6, 7])
GOLDEN_APS = [5 / 8, 1 / 2, 19 / 84, 1 / 4]


def test_golden_cmc_with_pessimistic_ties():
    got = cmc(S, Q_LAB, EYE8, G_LAB, topk=(1, 2, 5, 6, 7, 8))
    assert got == {1: 1 / 4, 2: 2 / 4, 5: 2 / 4, 6: 3 / 4, 7: 1.0, 8: 1.0}


def test_golden_recall_equals_cmc_and_k_above_gallery_size():
    got = recall_at_k(S, Q_LAB, EYE8, G_LAB, ks=(1, 5, 10))
    assert got == {1: 1 / 4, 5: 2 / 4, 10: 1.0}


def test_golden_map():
    got = mean_average_precision(S, Q_LAB, EYE8, G_LAB)
    assert got == pytest.approx(np.mean(GOLDEN_APS), abs=1e-12)
    for r, ap in zip([0, 1, 2, 4], GOLDEN_APS, strict=True):
        assert average_precision(S[r], G_LAB == Q_LAB[r]) == pytest.approx(ap, abs=1e-12)


def test_golden_summary_one_pass():
    got = retrieval_summary(S, Q_LAB, EYE8, G_LAB, topk=(1, 6), recall_ks=(5,), block=2)
    assert got == {
        "cmc@1": 0.25,
        "cmc@6": 0.75,
        "map": pytest.approx(np.mean(GOLDEN_APS), abs=1e-12),
        "recall@5": 0.5,
        "n_queries": 4,
    }


# Exclusion golden case: 4 items x 4 items, labels [0, 0, 1, 1], diagonal (self) at 100.
S_SELF = np.array(
    [
        [100, 1, 5, 0],  # positive 1 behind negative 5: rank 2, AP 1/2
        [3, 100, 2, 1],  # positive 3 first: rank 1, AP 1
        [0, 0, 100, 0],  # positive 0 tied with two negatives: rank 3, AP 1/3
        [1, 2, 3, 100],  # positive 3 first: rank 1, AP 1
    ],
    dtype=np.float32,
)
LAB4 = np.array([0, 0, 1, 1])


def test_golden_exclude_self():
    # q_emb != g_emb: the two sides may come from different models; only row r is excluded.
    eye4 = np.eye(4, dtype=np.float32)
    assert cmc(S_SELF, LAB4, eye4, LAB4, topk=(1, 2, 3), exclude_self=True) == {
        1: 0.5,
        2: 0.75,
        3: 1.0,
    }
    got = mean_average_precision(S_SELF, LAB4, eye4, LAB4, exclude_self=True)
    assert got == pytest.approx((1 / 2 + 1 + 1 / 3 + 1) / 4, abs=1e-12)
    # Without exclusion each query finds itself first.
    assert cmc(S_SELF, LAB4, eye4, LAB4, topk=(1,)) == {1: 1.0}
    # Row 0: positives at 100 (rank 1) and 1 (rank 3) -> AP (1 + 2/3) / 2.
    full = mean_average_precision(S_SELF[:1], LAB4[:1], eye4, LAB4)
    assert full == pytest.approx(5 / 6, abs=1e-12)


def test_exclude_self_skips_singleton_classes():
    # Item 2 is the only one of its class: once itself is excluded it has no positive.
    emb = np.eye(3, dtype=np.float32)
    got = retrieval_summary(emb, [0, 0, 1], emb, [0, 0, 1], exclude_self=True, topk=(1,))
    assert got["n_queries"] == 2
    with pytest.raises(ValueError, match="no query has a positive"):
        cmc(emb, [0, 1, 2], emb, [0, 1, 2], exclude_self=True)


def test_exclude_self_needs_equal_lengths():
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="exclude_self"):
        cmc(emb[:2], [0, 1], emb, [0, 1, 2], exclude_self=True)


def test_collapsed_model_scores_low():
    # All embeddings equal: every score ties, so pessimistic ranking puts negatives first.
    emb = np.ones((12, 4), dtype=np.float32) / 2.0
    lab = np.repeat(np.arange(4), 3)  # 2 positives, 9 negatives per query after exclusion
    got = retrieval_summary(emb, lab, emb, lab, exclude_self=True, topk=(1, 9, 10))
    assert got["cmc@1"] == 0.0 and got["cmc@9"] == 0.0 and got["cmc@10"] == 1.0
    assert got["map"] == pytest.approx(2 / 11, abs=1e-12)  # one threshold: P = 2/11, R = 1


# ------------------------------------------------------------------------ reference tests
def _brute_rank(scores: np.ndarray, same: np.ndarray) -> int:
    """Rank of the first positive: sort by score descending, negatives first within ties."""
    order = np.lexsort((same, -scores))  # last key is primary
    return int(np.flatnonzero(same[order])[0]) + 1


def _reference(q, ql, g, gl, exclude_self, ks):
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    ranks, aps = [], []
    for r in range(q.shape[0]):
        keep = np.ones(g.shape[0], dtype=bool)
        if exclude_self:
            keep[r] = False
        same = gl[keep] == ql[r]
        if not same.any():
            continue
        ranks.append(_brute_rank(sims[r, keep], same))
        aps.append(average_precision_score(same, sims[r, keep]))
    ranks = np.array(ranks)
    return {k: float(np.mean(ranks <= k)) for k in ks}, np.array(aps)


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block", [None, 7])
def test_against_sklearn_and_brute_force_with_ties(exclude_self, block):
    # Small-integer embeddings: exact float32 products and many tied scores.
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, size=(60, 6)).astype(np.float32)
    g = q.copy() if exclude_self else rng.integers(-2, 3, size=(90, 6)).astype(np.float32)
    ql = rng.integers(0, 8, size=q.shape[0])
    gl = ql.copy() if exclude_self else rng.integers(0, 9, size=g.shape[0])
    ks = (1, 3, 10)
    ref_cmc, ref_aps = _reference(q, ql, g, gl, exclude_self, ks)
    got = retrieval_summary(q, ql, g, gl, exclude_self, topk=ks, recall_ks=ks, block=block)
    assert {k: got[f"cmc@{k}"] for k in ks} == ref_cmc
    assert {k: got[f"recall@{k}"] for k in ks} == ref_cmc
    assert got["n_queries"] == len(ref_aps)
    assert got["map"] == pytest.approx(ref_aps.mean(), abs=1e-9)
    assert cmc(q, ql, g, gl, ks, exclude_self, block=block) == ref_cmc
    assert mean_average_precision(q, ql, g, gl, exclude_self, block=block) == got["map"]


def test_average_precision_per_query_matches_sklearn():
    rng = np.random.default_rng(2)
    for trial in range(40):
        n = int(rng.integers(2, 60))
        # Half the trials draw from few values so that ties are frequent.
        if trial % 2:
            scores = rng.integers(0, 5, size=n).astype(np.float64)
        else:
            scores = rng.normal(size=n)
        same = rng.random(n) < 0.3
        same[rng.integers(n)] = True
        assert average_precision(scores, same) == pytest.approx(
            average_precision_score(same, scores), abs=1e-9
        )


def test_map_float_data_blocked_matches_sklearn():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    g = rng.normal(size=(120, 16)).astype(np.float32)
    ql, gl = rng.integers(0, 10, size=50), rng.integers(0, 10, size=120)
    # Use the very scores the metric sees (one block: no BLAS blocking differences).
    ((_, sims),) = list(similarity_blocks(q, g, block=64))
    ref = [average_precision_score(gl == ql[r], sims[r]) for r in range(50) if (gl == ql[r]).any()]
    assert mean_average_precision(q, ql, g, gl, block=9) == pytest.approx(np.mean(ref), abs=1e-9)


def test_similarity_blocks_cover_all_queries():
    rng = np.random.default_rng(4)
    q, g = rng.normal(size=(10, 3)), rng.normal(size=(5, 3))
    blocks = list(similarity_blocks(q, g, block=4))
    assert [start for start, _ in blocks] == [0, 4, 8]
    assert [s.shape for _, s in blocks] == [(4, 5), (4, 5), (2, 5)]
    assert all(s.dtype == np.float32 for _, s in blocks)
    np.testing.assert_allclose(np.concatenate([s for _, s in blocks]), q @ g.T, rtol=1e-5)


# ------------------------------------------------------------------------------ TAR@FAR
def test_tar_at_far_golden():
    # Thresholds (accept score >= t): 0.9 -> FAR 0, TAR 1/3; 0.85 -> FAR 1/4, TAR 1/3;
    # 0.8 -> FAR 1/4, TAR 2/3; 0.5 -> FAR 1/2, TAR 2/3; 0.4 -> FAR 1/2, TAR 1.
    scores = [0.9, 0.8, 0.4, 0.85, 0.5, 0.2, 0.1]
    same = [True, True, True, False, False, False, False]
    got = tar_at_far(scores, same, fars=(0.1, 0.25, 0.3, 0.5, 1.0))
    assert got == {0.1: 1 / 3, 0.25: 2 / 3, 0.3: 2 / 3, 0.5: 1.0, 1.0: 1.0}


def test_tar_at_far_only_accepting_nothing_gives_zero():
    # Top score is an impostor: every threshold has FAR >= 1/2.
    assert tar_at_far([0.5, 0.9, 0.1], [True, False, False], fars=(0.1, 0.5)) == {
        0.1: 0.0,
        0.5: 1.0,
    }


def test_tar_at_far_tie_between_genuine_and_impostor():
    # A tie is accepted together: threshold 0.7 has FAR 1/2, so at FAR 0.1 nothing is accepted.
    assert tar_at_far([0.7, 0.7, 0.1], [True, False, False], fars=(0.1,)) == {0.1: 0.0}


def test_tar_at_far_matches_sklearn_roc():
    rng = np.random.default_rng(6)
    n = 20000
    same = rng.random(n) < 0.1
    scores = np.round(rng.normal(size=n) + 1.5 * same, 2)  # rounding creates ties
    fars = (1e-4, 1e-3, 1e-2, 0.1, 0.5)
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    ref = {f: float(tpr[fpr <= f].max()) for f in fars}
    assert tar_at_far(scores, same, fars=fars) == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------- inputs and validation
def test_torch_input_equals_numpy_input():
    rng = np.random.default_rng(7)
    q = rng.normal(size=(30, 8)).astype(np.float32)
    lab = rng.integers(0, 5, size=30)
    ref = retrieval_summary(q, lab, q, lab, exclude_self=True)
    got = retrieval_summary(
        torch.from_numpy(q).requires_grad_(), torch.from_numpy(lab), torch.from_numpy(q), lab, True
    )
    assert got == ref
    scores, same = rng.normal(size=50), rng.random(50) < 0.5
    assert tar_at_far(torch.from_numpy(scores), torch.from_numpy(same)) == tar_at_far(scores, same)
    assert average_precision(torch.from_numpy(scores), torch.from_numpy(same)) == (
        average_precision(scores, same)
    )


def test_inputs_are_not_modified():
    rng = np.random.default_rng(8)
    q = rng.normal(size=(20, 4)).astype(np.float32)
    lab = rng.integers(0, 3, size=20)
    scores, same = rng.normal(size=20), rng.random(20) < 0.5
    copies = [a.copy() for a in (q, lab, scores, same)]
    retrieval_summary(q, lab, q, lab, exclude_self=True, block=3)
    tar_at_far(scores, same)
    average_precision(scores, same)
    for a, c in zip((q, lab, scores, same), copies, strict=True):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"q_emb": np.ones(4)}, "q_emb must be 2-D"),
        ({"g_emb": np.ones((6, 3))}, "q_emb has dim 4 but g_emb has dim 3"),
        ({"q_lab": np.zeros(3)}, "q_lab has 3 labels"),
        ({"g_lab": np.zeros((6, 1))}, "g_lab must be 1-D"),
        ({"q_emb": np.full((4, 4), np.nan)}, "q_emb contains NaN"),
        ({"g_emb": np.full((6, 4), np.inf)}, "g_emb contains NaN or inf"),
        ({"q_lab": np.array([0.0, np.nan, 1.0, 1.0])}, "q_lab contains NaN"),
        ({"topk": (0,)}, "topk must hold positive integers"),
        ({"block": 0}, "block must be a positive integer"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, match):
    args = {
        "q_emb": np.ones((4, 4)),
        "q_lab": np.zeros(4),
        "g_emb": np.ones((6, 4)),
        "g_lab": np.zeros(6),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cmc(**args)


def test_bad_pair_input_raises():
    with pytest.raises(ValueError, match="same has shape"):
        tar_at_far([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="fars must lie in"):
        tar_at_far([0.1, 0.2], [True, False], fars=(0.0,))
    with pytest.raises(ValueError, match="scores contains NaN"):
        tar_at_far([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="same must be boolean"):
        average_precision([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="no positive"):
        average_precision([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="ks must hold"):
        recall_at_k(np.eye(2), [0, 0], np.eye(2), [0, 0], ks=(1.5,))


def test_pure_core_imports_no_heavy_modules():
    code = (
        "import sys, distcl.eval.metrics, distcl.eval.compat, distcl.eval.protocols\n"
        "bad = [m for m in ('ray', 'faiss', 'webdataset', 'pyarrow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------- verification accuracy
def _kfold_reference(scores, same, folds):
    """Independent implementation: sklearn KFold, brute force over every candidate threshold."""
    from sklearn.model_selection import KFold

    accs = []
    for train, test in KFold(folds, shuffle=False).split(scores):
        best_thr, best_acc = None, -1.0
        for thr in sorted(set(scores[train].tolist())):  # ascending: ties keep the smallest
            acc = np.mean((scores[train] >= thr) == same[train])
            if acc > best_acc:
                best_thr, best_acc = thr, acc
        accs.append(np.mean((scores[test] >= best_thr) == same[test]))
    return float(np.mean(accs))


def test_verification_accuracy_golden():
    # 4 pairs, 2 folds: fold 0 = pairs 0-1, fold 1 = pairs 2-3.
    scores = [0.9, 0.2, 0.8, 0.4]
    same = [True, False, True, True]
    # fold 0: train on (0.8 same, 0.4 same): thresholds 0.4 -> 2/2, 0.8 -> 1/2; pick 0.4.
    #   test: 0.9 >= 0.4 same (ok), 0.2 < 0.4 different (ok) -> 1.0
    # fold 1: train on (0.9 same, 0.2 diff): 0.2 -> 1/2, 0.9 -> 2/2; pick 0.9.
    #   test: 0.8 < 0.9 -> different (wrong), 0.4 -> different (wrong) -> 0.0
    assert verification_accuracy(scores, same, folds=2) == 0.5


@pytest.mark.parametrize("n, folds", [(200, 10), (203, 10), (57, 4)])
def test_verification_accuracy_equals_independent_kfold(n, folds):
    rng = np.random.default_rng(n)
    same = rng.random(n) < 0.5
    scores = np.round(rng.normal(size=n) + 1.2 * same, 1)  # rounding creates ties
    assert verification_accuracy(scores, same, folds) == pytest.approx(
        _kfold_reference(scores, same, folds), abs=1e-12
    )


def test_verification_accuracy_bad_input():
    with pytest.raises(ValueError, match="folds"):
        verification_accuracy([0.1, 0.2], [True, False], folds=1)
    with pytest.raises(ValueError, match="3 pairs cannot be cut into 10 folds"):
        verification_accuracy([0.1, 0.2, 0.3], [True, False, True])


# ------------------------------------------------------------------- template identification
def test_template_identification_golden():
    # class 0 items (1,0) and (0,1) -> template (1,1)/sqrt2; class 1 item (-1, 0) -> (-1, 0)
    g = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    gl = np.array([0, 0, 1])
    q = np.array([[1, 1], [-1, 0.1], [0.6, -0.8], [0, 1]], np.float32) / np.array(
        [[np.sqrt(2)], [np.sqrt(1.01)], [1.0], [1.0]], np.float32
    )
    ql = np.array([0, 1, 1, 7])  # the last query has no template: left out
    # q0 -> class 0 (1.0 vs -0.71): rank 1. q1 -> class 1 (0.995 vs -0.63): rank 1.
    # q2 (label 1): class 0 scores (0.6-0.8)/sqrt2 = -0.14, class 1 scores -0.6 -> rank 2.
    assert template_identification(q, ql, g, gl, topk=(1, 2)) == {1: 2 / 3, 2: 1.0}


def test_template_identification_tie_ranks_wrong_class_first():
    g = np.array([[1, 0], [0, 1]], np.float32)
    q = np.array([[np.sqrt(0.5), np.sqrt(0.5)]], np.float32)  # equidistant
    assert template_identification(q, [0], g, [0, 1], topk=(1, 2)) == {1: 0.0, 2: 1.0}


def test_template_identification_equals_brute_force():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(120, 6)).astype(np.float32)
    gl = rng.integers(0, 9, 120)
    q = rng.normal(size=(40, 6)).astype(np.float32)
    ql = rng.integers(0, 9, 40)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    classes = np.unique(gl)
    tmpl = np.stack([gn[gl == c].mean(0) for c in classes])
    tmpl /= np.linalg.norm(tmpl, axis=1, keepdims=True)
    ranks = []
    for x, y in zip(q, ql, strict=True):
        s = tmpl @ x
        ranks.append(1 + np.sum(s[classes != y] >= s[classes == y][0]))
    ranks = np.array(ranks)
    got = template_identification(q, ql, g, gl, topk=(1, 3))
    assert got[1] == pytest.approx(np.mean(ranks <= 1))
    assert got[3] == pytest.approx(np.mean(ranks <= 3))


# ------------------------------------------------------------------- metrics from top-k lists
def test_topk_counts_on_full_lists_equal_exact_metrics_with_ties():
    rng = np.random.default_rng(5)
    q = np.round(rng.normal(size=(25, 4)), 1).astype(np.float32)
    g = np.round(rng.normal(size=(30, 4)), 1).astype(np.float32)
    ql, gl = rng.integers(0, 4, 25), rng.integers(0, 4, 30)
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")
    scores = np.take_along_axis(sims, order, 1)
    same = gl[order] == ql[:, None]
    hits, ap, n = topk_counts(scores, same, same.sum(1), (1, 5), map_k=30)
    ref = retrieval_summary(q, ql, g, gl, topk=(1, 5), recall_ks=(1,))
    assert n == ref["n_queries"]
    assert hits[0] / n == pytest.approx(ref["cmc@1"]) and hits[1] / n == pytest.approx(ref["cmc@5"])
    assert ap / n == pytest.approx(ref["map"])


def test_topk_counts_golden_ap_at_k():
    # one query, 3 positives in the gallery; list of 4: + - + -  -> AP@4 = (1 + 2/3) / 3
    hits, ap, n = topk_counts([[4.0, 3.0, 2.0, 1.0]], [[1, 0, 1, 0]], [3], (1, 2), map_k=4)
    assert n == 1 and hits.tolist() == [1, 1] and ap == pytest.approx((1 + 2 / 3) / 3)
    # AP@2 divides by min(n_pos, 2)
    assert topk_counts([[4.0, 3.0]], [[1, 0]], [3], (1,), map_k=2)[1] == pytest.approx(0.5)
    # a query without positive anywhere is not counted; no match in the list -> no hit
    hits, _, n = topk_counts([[2.0, 1.0], [2.0, 1.0]], [[0, 0], [0, 0]], [0, 4], (2,))
    assert n == 1 and hits.tolist() == [0]


# ---------------------------------------------------------------- open-set 1:N identification
def _tpir_brute(S, q_lab, g_lab, fpir):
    """TPIR by brute force: per probe its top-1 (a tie between labels is a miss), then the
    smallest threshold among the non-mated top-1 scores (and -inf) whose FPIR <= fpir."""
    mated = np.isin(q_lab, g_lab)
    top = S.max(1)
    correct = np.array([
        m and (S[r][g_lab == q_lab[r]].max() > S[r][g_lab != q_lab[r]].max(initial=-np.inf))
        for r, m in enumerate(mated)
    ])  # fmt: skip
    nm = top[~mated]
    if fpir * len(nm) < 1:
        return float("nan")
    best = None
    for t in sorted(set(nm.tolist()) | {-np.inf}):
        if (nm > t).sum() / len(nm) <= fpir:
            best = t
            break
    return float((correct[mated] & (top[mated] > best)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_open_set_identification_equals_brute_force_ties_included(seed):
    rng = np.random.default_rng(seed)
    # coarse grid values: many exact ties between scores
    g = rng.integers(-2, 3, size=(40, 4)).astype(np.float32)
    g_lab = rng.integers(0, 5, size=40)
    g_lab[:5] = -1  # distractors: never a match
    q = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    q_lab = rng.integers(0, 8, size=60)  # classes 5..7 are not enrolled: non-mated
    S = q @ g.T
    fpirs = (0.01, 0.05, 0.1, 0.3, 1.0)
    got = mt.open_set_identification(q, q_lab, g, g_lab, fpir=fpirs)
    for f in fpirs:
        want = _tpir_brute(S, q_lab, g_lab, f)
        assert (np.isnan(got[f]) and np.isnan(want)) or got[f] == pytest.approx(want), f


def test_open_set_identification_hand_computed():
    """2-d: enrolled classes 0 and 1; probes: two mated (one right at rank 1, one tied with a
    wrong class: a miss), two non-mated with top-1 scores 0.9 and 0.2."""
    g = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    g_lab = np.array([0, 1, -1])  # the third row: a distractor
    q = np.array([[1, 0], [0.6, 0.8], [0.9, 0.1], [0.2, 0]], np.float32)
    q_lab = np.array([0, 1, 7, 8])
    # probe 1 (class 1): scores 0.6 (class 0), 0.8 (class 1), 1.0 (distractor) -> miss
    res = mt.tpir_from_best(*mt.best_scores(q, q_lab, g, g_lab), np.array([1, 1, 0, 0], bool),
                            (0.5, 1.0, 0.1))  # fmt: skip
    assert res["rank1"] == 0.5
    # FPIR 0.5: k = 1, t = the 2nd non-mated score (0.2): probe 0 (score 1.0) passes
    assert res["tpir@fpir=5e-1"] == 0.5 and res["tpir@fpir=1e0"] == 0.5
    assert np.isnan(res["tpir@fpir=1e-1"])  # below 1 / 2 non-mated probes: not measurable
    with pytest.raises(ValueError, match="needs mated probes"):
        mt.tpir_from_best(np.zeros(2), np.zeros(2), np.zeros(2, bool), (0.1,))

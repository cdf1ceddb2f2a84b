"""Tests of distcl.eval.compat: hand-made matrices with exact scores, matrix builders.

Run: `.venv/bin/python -m pytest tests/test_compat.py -q`.
Values are multiples of 1/8, exact in binary, so expected scores compare with ==.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distcl.eval.compat import (
    average_compatibility,
    average_multimodel_accuracy,
    backward_compatibility,
    compatibility_matrices,
    compatibility_matrix,
    ecc_matrix,
    forward_compatibility,
    summarize,
)
from distcl.eval.metrics import retrieval_summary

NAN = np.nan
# (1, 0): 0.625 > 0.5 compatible; (2, 0): 0.25 > 0.5 no; (2, 1): 0.875 > 0.75 compatible.
M3 = np.array(
    [
        [0.5, NAN, NAN],
        [0.625, 0.75, NAN],
        [0.25, 0.875, 1.0],
    ]
)


def test_hand_made_3x3():
    assert average_compatibility(M3) == 2 / 3  # 2 of 3 pairs
    assert average_multimodel_accuracy(M3) == 4.0 / 6  # (0.5+0.625+0.75+0.25+0.875+1) * 2/12
    # BC = ((0.25 - 0.5) + (0.875 - 0.75)) / 2
    assert backward_compatibility(M3) == -0.0625
    # FC = ((0.625 - 0.75) + (0.875 - 1.0)) / 2
    assert forward_compatibility(M3) == -0.125
    expected_ecc = [[False, False, False], [True, False, False], [False, True, False]]
    assert ecc_matrix(M3).tolist() == expected_ecc
    assert summarize(M3) == {
        "ac": 2 / 3,
        "am": 4.0 / 6,
        "bc": -0.0625,
        "fc": -0.125,
        "ecc": expected_ecc,
        "n_compatible": 2,
        "n_pairs": 3,
        "ties": "strict",
    }


def test_upper_triangle_is_ignored():
    filled = np.where(np.isnan(M3), 7.0, M3)  # garbage above the diagonal must not matter
    assert summarize(filled) == summarize(M3)


def test_ecc_is_strict():
    m = np.array([[0.5, NAN], [0.5, 0.9]])  # equal to the old self-test: NOT compatible
    assert not ecc_matrix(m)[1, 0]
    assert average_compatibility(m) == 0.0
    assert average_compatibility(np.array([[0.5, NAN], [0.5 + 2**-20, 0.9]])) == 1.0


def test_single_model():
    m = np.array([[0.75]])
    assert average_multimodel_accuracy(m) == 0.75
    for fn in (average_compatibility, backward_compatibility, forward_compatibility):
        with pytest.raises(ValueError, match="T >= 2"):
            fn(m)
    s = summarize(m)
    assert np.isnan(s["ac"]) and np.isnan(s["bc"]) and np.isnan(s["fc"])
    assert (s["am"], s["ecc"], s["n_compatible"], s["n_pairs"]) == (0.75, [[False]], 0, 0)


def test_bad_matrix_raises():
    with pytest.raises(ValueError, match="square"):
        average_multimodel_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lower triangle"):
        average_compatibility(np.array([[0.5, NAN], [NAN, 0.5]]))


def test_matrix_input_not_modified_and_torch_accepted():
    m = M3.copy()
    summarize(m)
    np.testing.assert_array_equal(m, M3)
    assert summarize(torch.from_numpy(M3)) == summarize(M3)


# ------------------------------------------------------------------------- matrix builders
LAB = np.repeat(np.arange(3), 2)  # 6 items, 3 classes of 2


def _one_hot(dim_of_class: list[int], dim: int = 6) -> np.ndarray:
    """Embed each item as the basis vector chosen for its class."""
    return np.eye(dim, dtype=np.float32)[[dim_of_class[c] for c in LAB]]


def test_compatibility_matrix_golden():
    # Model 0 and model 2 use the same space; model 1 a disjoint one. Across disjoint spaces
    # every score is 0, all ties, so the pessimistic rank is last and CMC@1 = 0.
    embs = [_one_hot([0, 1, 2]), _one_hot([3, 4, 5]), _one_hot([0, 1, 2])]
    m = compatibility_matrix(embs, LAB, metric="cmc@1")
    expected = np.array([[1.0, NAN, NAN], [0.0, 1.0, NAN], [1.0, 0.0, 1.0]])
    np.testing.assert_array_equal(m, expected)
    # Model 2 equals model 0 on model 0's gallery, which is not "better than": AC = 0.
    assert average_compatibility(m) == 0.0


def test_compatibility_matrices_match_retrieval_summary():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, size=40)
    embs = [rng.normal(size=(40, 8)).astype(np.float32) for _ in range(3)]
    metrics = ("cmc@1", "cmc@3", "map", "recall@5")
    got = compatibility_matrices(embs, torch.from_numpy(lab), metrics=metrics)
    assert set(got) == set(metrics)
    for name in metrics:
        np.testing.assert_array_equal(got[name], compatibility_matrix(embs, lab, metric=name))
        for i in range(3):
            for j in range(3):
                if j > i:
                    assert np.isnan(got[name][i, j])
                else:
                    ref = retrieval_summary(
                        embs[i], lab, embs[j], lab, True, topk=(1, 3), recall_ks=(5,)
                    )
                    assert got[name][i, j] == ref[name]


def test_seen_masks_use_mask_of_gallery_model():
    # 4 items, classes [0, 0, 1, 1]. Model 0 saw only class 0 and maps everything to e0;
    # model 1 separates the classes.
    lab = np.array([0, 0, 1, 1])
    old = np.eye(2, dtype=np.float32)[[0, 0, 0, 0]]
    new = np.eye(2, dtype=np.float32)[[0, 0, 1, 1]]
    # "all": old self-test ties its one positive with two negatives -> CMC@1 0; new on old
    # gallery: same ties -> 0.
    m_all = compatibility_matrix([old, new], lab)
    np.testing.assert_array_equal(m_all, [[0.0, NAN], [0.0, 1.0]])
    # "seen": pairs (0, 0) and (1, 0) use only class-0 items (mask 0), where each query's
    # only other item is its positive; (1, 1) uses mask 1 (all items).
    masks = [lab == 0, np.ones(4, dtype=bool)]
    m_seen = compatibility_matrix([old, new], lab, seen_masks=masks)
    np.testing.assert_array_equal(m_seen, [[1.0, NAN], [1.0, 1.0]])
    assert not ecc_matrix(m_seen)[1, 0]  # 1.0 vs its reference M_seen[0][0] = 1.0: strict


def test_exclude_self_false_lets_each_query_find_itself():
    embs = [_one_hot([0, 0, 0]), _one_hot([0, 0, 0])]  # collapsed models
    np.testing.assert_array_equal(
        compatibility_matrix(embs, LAB, exclude_self=True), [[0.0, NAN], [0.0, 0.0]]
    )
    # Without exclusion every item is a positive of itself, but 4 negatives tie with it.
    m = compatibility_matrix(embs, LAB, metric="cmc@5", exclude_self=False)
    np.testing.assert_array_equal(m, [[1.0, NAN], [1.0, 1.0]])


def test_builder_bad_input_raises():
    embs = [_one_hot([0, 1, 2]), _one_hot([0, 1, 2])]
    with pytest.raises(ValueError, match="metric 'cmc1'"):
        compatibility_matrix(embs, LAB, metric="cmc1")
    with pytest.raises(ValueError, match=r"embeddings\[1\] has 5 rows"):
        compatibility_matrix([embs[0], embs[1][:5]], LAB)
    with pytest.raises(ValueError, match="labels must have shape"):
        compatibility_matrix(embs, LAB[:5])
    with pytest.raises(ValueError, match="seen_masks has 1 masks"):
        compatibility_matrix(embs, LAB, seen_masks=[LAB == 0])
    with pytest.raises(ValueError, match=r"seen_masks\[0\] must be a bool"):
        compatibility_matrix(embs, LAB, seen_masks=[LAB, LAB == 0])
    with pytest.raises(ValueError, match="embeddings must hold"):
        compatibility_matrix([], LAB)
    with pytest.raises(ValueError, match=r"embeddings\[0\] contains NaN"):
        compatibility_matrix([np.full((6, 6), np.nan)], LAB)


def test_tie_rule_pass_counts_equal_as_compatible():
    M = np.array([[0.5, NAN, NAN], [0.5, 0.7, NAN], [0.4, 0.7, 0.9]])
    # strict: (1,0) tie fails, (2,0) 0.4<0.5 fails, (2,1) 0.7=0.7 tie fails -> AC 0
    assert average_compatibility(M) == 0.0
    # ties pass: both ties pass, (2,0) still fails -> 2/3
    assert average_compatibility(M, ties="pass") == pytest.approx(2 / 3)
    assert average_compatibility(M, ties="ties_pass") == pytest.approx(2 / 3)
    assert ecc_matrix(M, "ties_pass").tolist() == [
        [False, False, False], [True, False, False], [False, True, False]
    ]  # fmt: skip
    assert summarize(M, ties="ties_pass")["ties"] == "pass"
    with pytest.raises(ValueError, match="ties must be one of"):
        average_compatibility(M, ties="loose")


def test_iamcl2r_ac_and_am_on_a_hand_made_matrix():
    from distcl.eval import compat

    """As iamcl2r's compatibility_metrics.py: a pair (i, j) passes only if M[i][j] > M[j][j]
    (a tie fails); AM is the mean of the non-zero entries of the lower triangle."""
    M = np.array([[0.6, np.nan, np.nan],
                  [0.6, 0.7, np.nan],
                  [0.65, 0.0, 0.8]])  # fmt: skip
    # pairs: (1,0) 0.6 vs 0.6 tie -> fails; (2,0) 0.65 > 0.6 passes; (2,1) 0.0 < 0.7 fails
    assert compat.average_compatibility(M, ties="strict") == pytest.approx(1 / 3)
    # AM over the lower triangle's non-zero entries: (0.6 + 0.6 + 0.7 + 0.65 + 0.8) / 5
    assert compat.average_multimodel_accuracy(M, ignore_zeros=True) == pytest.approx(0.67)
    # distcl's own AM counts the 0: six entries
    assert compat.average_multimodel_accuracy(M) == pytest.approx(3.35 / 6)
    s = compat.summarize(M, "strict", am_ignores_zeros=True)
    assert s["am"] == pytest.approx(0.67) and s["n_compatible"] == 1
    # a tie on a 2 x 2 matrix: [[0.6, 0], [0.6, 0.7]] -> AC 0, AM 0.6333
    M2 = np.array([[0.6, np.nan], [0.6, 0.7]])
    assert compat.average_compatibility(M2) == 0.0
    assert compat.average_multimodel_accuracy(M2, ignore_zeros=True) == pytest.approx(1.9 / 3)
    assert np.isnan(compat.average_multimodel_accuracy(np.zeros((1, 1)), ignore_zeros=True))


def test_summary_reads_the_measurable_entries_only():
    """An entry that could not be measured (NaN in the lower triangle): AC over the pairs
    whose two entries are numbers, AM/BC/FC over the numbers; hand-computed."""
    from distcl.eval import compat

    M = np.array([[np.nan, NAN, NAN],
                  [0.5, 0.6, NAN],
                  [0.7, 0.5, 0.8]])  # fmt: skip
    s = compat.summarize(M)
    assert s["n_pairs"] == 1 and s["n_compatible"] == 0  # only (2, 1): 0.5 > 0.6 fails
    assert s["ac"] == 0.0 and s["unmeasured"] == 1
    assert s["am"] == pytest.approx((0.5 + 0.6 + 0.7 + 0.5 + 0.8) / 5)
    assert s["bc"] == pytest.approx(0.5 - 0.6)  # (3, 1) has no diagonal to compare with
    assert s["fc"] == pytest.approx(((0.5 - 0.6) + (0.5 - 0.8)) / 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        compat.average_compatibility(M)  # the plain scores still refuse it

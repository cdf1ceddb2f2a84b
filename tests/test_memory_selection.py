"""Unit tests of the pure exemplar selection policies (distcl.memory.selection); no Ray.

Run: ``.venv/bin/python -m pytest tests/test_memory_selection.py -q``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from distcl.memory.selection import (
    herding_order,
    per_class_budget,
    random_order,
    select_exemplars,
    shrink,
)

# Hand-made class: rows normalise to a=(1,0), b=(0,1), c=(.6,.8), d=(.7071,.7071).
# mu = (0.57678, 0.62678).
# k=1, ||x - mu||^2: a .572, b .472, c .0305, d .0234             -> d (3)
# k=2, ||(d + x)/2 - mu||^2: a .151, b .101, c .0220              -> c (2)
# k=3, ||(d + c + x)/3 - mu||^2: a .0525, b .0635                 -> a (0), then b (1)
# Nearest-to-mean order would be [3, 2, 1, 0]: herding differs at k=3.
FEATS = np.array([[2.0, 0.0], [0.0, 3.0], [3.0, 4.0], [1.0, 1.0]])


def test_herding_golden_hand_computed() -> None:
    np.testing.assert_array_equal(herding_order(FEATS, 4), [3, 2, 0, 1])
    np.testing.assert_array_equal(herding_order(FEATS, 2), [3, 2])
    np.testing.assert_array_equal(herding_order(FEATS, 10), [3, 2, 0, 1])  # capped at N
    assert herding_order(FEATS, 0).shape == (0,)


def test_herding_is_scale_invariant_per_row() -> None:
    scales = np.array([[0.1], [7.0], [0.5], [100.0]])
    np.testing.assert_array_equal(herding_order(FEATS * scales, 4), [3, 2, 0, 1])


def _herding_reference(features: np.ndarray, m: int) -> list[int]:
    """Independent, loop-based iCaRL herding (Rebuffi et al., Algorithm 4)."""
    phi = [f / np.linalg.norm(f) for f in features]
    mu = sum(phi) / len(phi)
    chosen: list[int] = []
    for k in range(1, m + 1):
        best, best_d = -1, np.inf
        for i, p in enumerate(phi):
            if i in chosen:
                continue
            d = np.linalg.norm(mu - (p + sum((phi[j] for j in chosen), np.zeros_like(mu))) / k)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_matches_reference_on_random_features() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 5))
    got = herding_order(feats, 12)
    assert got.tolist() == _herding_reference(feats, 12)
    assert len(set(got.tolist())) == 12


def test_herding_bad_input() -> None:
    with pytest.raises(ValueError, match="features"):
        herding_order(np.ones(4), 2)
    with pytest.raises(ValueError, match="m must"):
        herding_order(FEATS, -1)


def test_random_order_distinct_seeded() -> None:
    a = random_order(10, 4, np.random.default_rng(3))
    b = random_order(10, 4, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 4 and a.min() >= 0 and a.max() < 10
    assert sorted(random_order(5, 9, np.random.default_rng(0)).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="m must"):
        random_order(5, -1, np.random.default_rng(0))


def test_select_exemplars_herding_per_class_golden() -> None:
    # Class 7 is FEATS at rows 1, 3, 5, 7; class 2 is rows 0, 2, 4, 6 (any features).
    labels = np.array([2, 7, 2, 7, 2, 7, 2, 7])
    feats = np.zeros((8, 2))
    feats[[1, 3, 5, 7]] = FEATS
    feats[[0, 2, 4, 6]] = [[1, 0], [0, 1], [1, 1], [1, 0.9]]
    out = select_exemplars(labels, feats, per_class=3, policy="herding", seed=0)
    assert sorted(out) == [2, 7]
    np.testing.assert_array_equal(out[7], [7, 5, 1])  # local [3, 2, 0] -> global rows
    # Class 2 normalised: (1,0), (0,1), (.7071,.7071), (.7433,.6690); mu = (.6126, .5940).
    # k=1: .503, .540, .0217, .0227 -> (1,1) row 4; k=2: .1159, .1345, -, .0215 -> row 6;
    # k=3: (1,0) .0600, (0,1) .0559 -> row 2.
    np.testing.assert_array_equal(out[2], [4, 6, 2])


def test_select_exemplars_random() -> None:
    labels = np.repeat([0, 1, 2], 10)
    for policy in ("random",):
        out = select_exemplars(labels, None, per_class=4, policy=policy, seed=1)
        again = select_exemplars(labels, None, per_class=4, policy=policy, seed=1)
        for c in (0, 1, 2):
            np.testing.assert_array_equal(out[c], again[c])
            assert len(out[c]) == 4 and np.all(labels[out[c]] == c)
            assert len(set(out[c].tolist())) == 4
        # A class's choice does not depend on the other classes present.
        alone = select_exemplars(labels[10:20], None, per_class=4, policy=policy, seed=1)
        np.testing.assert_array_equal(alone[1] + 10, out[1])
        other = select_exemplars(labels, None, per_class=4, policy=policy, seed=2)
        assert any(not np.array_equal(out[c], other[c]) for c in (0, 1, 2))


def test_select_exemplars_bad_input() -> None:
    with pytest.raises(ValueError, match="features"):
        select_exemplars(np.array([0, 1]), None, 2, "herding", 0)
    with pytest.raises(ValueError, match="policy"):
        select_exemplars(np.array([0, 1]), None, 2, "fifo", 0)
    with pytest.raises(ValueError, match="features"):
        select_exemplars(np.array([0, 1]), np.ones((3, 2)), 2, "herding", 0)


def test_per_class_budget() -> None:
    assert per_class_budget(2, None, 20) == 10
    assert per_class_budget(3, None, 20) == 6
    assert per_class_budget(4, None, 20) == 5
    assert per_class_budget(0, None, 20) == 20
    assert per_class_budget(4, 7, None) == 7
    assert per_class_budget(4, 7, 20) == 5  # both: the smaller wins
    assert per_class_budget(2, 7, 20) == 7
    with pytest.raises(ValueError, match="per_class or total"):
        per_class_budget(2, None, None)
    with pytest.raises(ValueError, match="n_classes"):
        per_class_budget(-1, 3, None)


def test_shrink_keeps_first_m() -> None:
    order = {0: [5, 3, 1], 1: np.array([9, 8]), 2: []}
    out = shrink(order, 2)
    assert out[0] == [5, 3] and out[1].tolist() == [9, 8] and out[2] == []
    assert order[0] == [5, 3, 1]  # input untouched
    with pytest.raises(ValueError, match="m must"):
        shrink(order, -1)


def test_selection_stays_pure() -> None:
    code = (
        "import sys, distcl.memory.selection\n"
        "bad = [m for m in ('ray', 'faiss', 'webdataset', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_balanced_sample_is_class_balanced_seeded_and_shuffled() -> None:
    from distcl.memory.selection import balanced_sample

    labels = np.repeat([3, 5, 9], [2, 4, 6])  # sorted by class, as the memory stores them
    rows = balanced_sample(labels, 7, np.random.default_rng(0))
    counts = np.bincount(labels[rows], minlength=10)[[3, 5, 9]]
    assert sorted(counts.tolist()) == [2, 2, 3] and len(rows) == 7
    np.testing.assert_array_equal(rows, balanced_sample(labels, 7, np.random.default_rng(0)))
    # Class 3 has 2 rows: a quota of 3 from it draws with replacement, never out of class.
    many = balanced_sample(labels, 30, np.random.default_rng(1))
    assert np.bincount(labels[many], minlength=10)[[3, 5, 9]].tolist() == [10, 10, 10]
    assert len(balanced_sample(labels[:0], 5, np.random.default_rng(0))) == 0
    with pytest.raises(ValueError, match="n must be"):
        balanced_sample(labels, -1, np.random.default_rng(0))

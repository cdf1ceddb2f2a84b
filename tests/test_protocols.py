"""Tests of distcl.eval.protocols: the seeded item selections of each protocol.

Run: ``.venv/bin/python -m pytest tests/test_protocols.py -q``
"""

from __future__ import annotations

import numpy as np
import pytest

from distcl.eval import protocols as pr

LABELS = np.repeat(np.arange(10), 6)  # (60,) 10 classes of 6 items


def test_closed_subset_matches_the_pre_heldout_selection():
    closed = LABELS < 7
    got = pr.closed_subset(LABELS, closed, 2, seed=3)
    # the selection distcl made before held-out classes existed, on the closed items only
    lab = LABELS[closed]
    rng = np.random.default_rng([3, 5])
    keep = np.sort(np.concatenate(
        [rng.permutation(np.flatnonzero(lab == c))[:2] for c in np.unique(lab)]
    ))  # fmt: skip
    assert np.flatnonzero(got).tolist() == np.flatnonzero(closed)[keep].tolist()
    assert pr.closed_subset(LABELS, closed, None, 0).tolist() == closed.tolist()


def test_open_split_probes_gallery_and_distractors():
    pool = LABELS >= 4  # 6 held-out classes
    split = pr.open_split(LABELS, pool, probes_per_class=2, distractor_classes=2, seed=0)
    assert not (split.probes & split.gallery).any()
    assert ((split.probes | split.gallery) == pool).all()
    assert len(split.distractor_classes) == 2 and set(split.distractor_classes) <= set(range(4, 10))
    for c in range(4, 10):
        n_probe = int((split.probes & (LABELS == c)).sum())
        n_gallery = int((split.gallery & (LABELS == c)).sum())
        if c in split.distractor_classes:
            assert (n_probe, n_gallery) == (0, 6)
        else:
            assert (n_probe, n_gallery) == (2, 4)
    again = pr.open_split(LABELS, pool, 2, 2, seed=0)
    assert (again.probes == split.probes).all()
    other = pr.open_split(LABELS, pool, 2, 2, seed=1)
    assert not (other.probes == split.probes).all()


def test_open_split_keeps_a_gallery_item_per_probe_class():
    labels = np.array([0, 0, 1, 2, 2, 2])
    split = pr.open_split(
        labels, np.ones(6, bool), probes_per_class=5, distractor_classes=0, seed=0
    )
    assert split.probes.tolist().count(True) == 1 + 0 + 2  # n - 1 probes; class 1 has none
    assert split.gallery[labels == 1].all()
    with pytest.raises(ValueError, match="eval.distractor_classes"):
        pr.open_split(labels, np.ones(6, bool), 1, 3, 0)


def test_verification_pairs_are_seeded_balanced_and_labelled():
    pool = LABELS >= 3
    a, b, same = pr.verification_pairs(LABELS, pool, 300, seed=4)
    assert len(a) == len(b) == len(same) == 600 and same.sum() == 300
    assert pool[a].all() and pool[b].all()
    assert ((LABELS[a] == LABELS[b]) == same).all()
    assert (a[same] != b[same]).all()  # genuine pairs are two distinct items
    assert 0.3 < same[:300].mean() < 0.7  # shuffled: both kinds in every fold
    a2, b2, s2 = pr.verification_pairs(LABELS, pool, 300, seed=4)
    assert (a2 == a).all() and (b2 == b).all() and (s2 == same).all()


def test_metric_names():
    assert pr.far_name(1e-3) == "tar@far=1e-3" and pr.far_name(0.05) == "tar@far=5e-2"
    assert pr.metric_names("verification", (1,), (1,), "cmc@1", (1e-2,)) == [
        "verif_acc", "tar@far=1e-2"
    ]  # fmt: skip
    assert pr.metric_names("identification", (1, 5), (1,), "map", ()) == [
        "ident_cmc@1", "ident_cmc@5"
    ]  # fmt: skip
    assert pr.metric_names("open", (1,), (1, 10), "map@10", ()) == [
        "cmc@1", "recall@1", "recall@10", "map", "map@10"
    ]  # fmt: skip
    assert pr.main_metric("identification", "cmc@5", (1, 5)) == "ident_cmc@5"
    assert pr.main_metric("identification", "map", (1, 5)) == "ident_cmc@1"
    assert pr.main_metric("verification", "cmc@1", (1,)) == "verif_acc"

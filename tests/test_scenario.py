"""Tests of distcl.data.scenario: the properties of the disjoint, blurry and general setups
(class disjointness, blurry fraction, recurrence, every training item used exactly once,
gallery arrivals), determinism by seed, subsampling and max_tasks truncation.

Run: ``.venv/bin/python -m pytest tests/test_scenario.py -q``
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from distcl.config import ScenarioConfig
from distcl.data.scenario import Scenario, build_scenario, subsample_per_class

CLASSES = 10
# Labels in a shuffled order, as in Fashion-MNIST: an item's index says nothing of its class.
TRAIN = np.random.default_rng(0).permutation(np.repeat(np.arange(CLASSES), 200))  # (2000,)
TEST = np.random.default_rng(1).permutation(np.repeat(np.arange(CLASSES), 30))  # (300,)


def scenario(seed: int = 0, train=TRAIN, test=TEST, **kw) -> Scenario:
    return build_scenario(train, test, ScenarioConfig(**kw), seed)


def assert_partition(parts: list[np.ndarray], universe: np.ndarray) -> None:
    """``parts`` together hold every element of ``universe`` exactly once."""
    joined = np.concatenate(parts)
    assert len(joined) == len(universe)
    np.testing.assert_array_equal(np.sort(joined), np.sort(universe))


def gallery_tasks(scen: Scenario, c: int) -> list[int]:
    return [t.index for t in scen.tasks if (TEST[t.gallery_items] == c).any()]


def training_tasks(scen: Scenario, c: int) -> list[int]:
    return [t.index for t in scen.tasks if (TRAIN[t.train_items] == c).any()]


# ---------------------------------------------------------------- disjoint


def test_disjoint_classes_and_items():
    scen = scenario(setup="disjoint", tasks=5)
    assert scen.num_tasks == 5 and sorted(scen.class_order) == list(range(CLASSES))
    seen: list[int] = []
    for t in scen.tasks:
        assert len(t.new_classes) == 2
        assert set(t.train_classes) == set(t.new_classes)
        assert set(TRAIN[t.train_items]) == set(t.new_classes)
        assert not set(t.new_classes) & set(seen)  # no class recurs
        seen += list(t.new_classes)
        assert t.seen_classes == tuple(seen)
        # Gallery items are the test items of this task's classes, all of them.
        assert set(TEST[t.gallery_items]) == set(t.new_classes)
        assert len(t.gallery_items) == 2 * 30
        assert t.train_items.dtype == np.int64 and t.gallery_items.dtype == np.int64
    assert_partition([t.train_items for t in scen.tasks], np.arange(len(TRAIN)))
    assert_partition([t.gallery_items for t in scen.tasks], np.arange(len(TEST)))
    np.testing.assert_array_equal(scen.eval_items, np.arange(len(TEST)))
    assert scen.classes == scen.class_order


def test_uneven_split_and_classes_per_task():
    scen = scenario(tasks=3)  # 10 classes over 3 tasks: 4, 3, 3
    assert [len(t.new_classes) for t in scen.tasks] == [4, 3, 3]
    scen = scenario(tasks=3, classes_per_task=2)  # 6 of the 10 classes are used
    assert [len(t.new_classes) for t in scen.tasks] == [2, 2, 2]
    used = set(scen.classes)
    assert len(used) == 6 and used == set(scen.class_order[:6])
    assert set(TEST[scen.eval_items]) == used and set(TRAIN[np.concatenate(
        [t.train_items for t in scen.tasks])]) == used  # fmt: skip


def test_first_task_classes_takes_a_larger_base_task():
    scen = scenario(tasks=5, first_task_classes=6)  # 6, then 1, 1, 1, 1
    assert [len(t.new_classes) for t in scen.tasks] == [6, 1, 1, 1, 1]
    assert list(scen.tasks[0].new_classes) == list(scen.class_order[:6])
    assert scen.tasks[1].seen_classes == scen.class_order[:7]
    scen = scenario(tasks=3, first_task_classes=4, classes_per_task=2)  # 4, 2, 2
    assert [len(t.new_classes) for t in scen.tasks] == [4, 2, 2]
    assert [len(t.new_classes) for t in scenario(tasks=1, first_task_classes=3).tasks] == [3]


def test_no_shuffle_keeps_label_order():
    scen = scenario(shuffle_classes=False, tasks=5)
    assert scen.class_order == tuple(range(CLASSES))
    assert scen.tasks[0].new_classes == (0, 1)


# ---------------------------------------------------------------- blurry


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_blurry_fraction(fraction):
    scen = scenario(setup="blurry", tasks=5, blurry_fraction=fraction)
    assert_partition([t.train_items for t in scen.tasks], np.arange(len(TRAIN)))
    for t in scen.tasks:
        labels = TRAIN[t.train_items]
        foreign = ~np.isin(labels, t.new_classes)  # items of other tasks' classes
        # 400 own items per task, round(400 f) of them moved out to random other tasks;
        # about as many come in from the other four tasks.
        assert abs(foreign.mean() - fraction) < 0.05, (t.index, foreign.mean())
        own = (~foreign).sum()
        assert own == 400 - round(400 * fraction)
        assert set(t.new_classes) <= set(t.train_classes)
        assert len(t.train_classes) > len(t.new_classes)  # blurred by other classes
    # A class's gallery items arrive with its introduction, not its minor appearances.
    for t in scen.tasks:
        assert set(TEST[t.gallery_items]) == set(t.new_classes)


def test_blurry_zero_fraction_is_disjoint():
    blurry = scenario(setup="blurry", tasks=5, blurry_fraction=0.0)
    disjoint = scenario(setup="disjoint", tasks=5)
    for b, d in zip(blurry.tasks, disjoint.tasks, strict=True):
        np.testing.assert_array_equal(b.train_items, d.train_items)
        np.testing.assert_array_equal(b.gallery_items, d.gallery_items)


# ---------------------------------------------------------------- general


def test_general_recurrence_and_items_once():
    scen = scenario(setup="general", tasks=5, recur_prob=0.9)
    assert_partition([t.train_items for t in scen.tasks], np.arange(len(TRAIN)))
    assert_partition([t.gallery_items for t in scen.tasks], np.arange(len(TEST)))
    recurring = [c for c in range(CLASSES) if len(training_tasks(scen, c)) > 1]
    assert recurring, "recur_prob=0.9 must make some class train in more than one task"
    for t in scen.tasks:
        assert set(t.new_classes) <= set(t.train_classes)
    for c in range(CLASSES):
        trained = training_tasks(scen, c)
        intro = next(t.index for t in scen.tasks if c in t.new_classes)
        assert trained[0] == intro  # a class first trains when it is introduced
        # Half of the class's 200 items at its introduction.
        assert (TRAIN[scen.tasks[intro].train_items] == c).sum() == (
            200 if len(trained) == 1 else 100
        )
        # Gallery items arrive with every task that trains on the class.
        assert gallery_tasks(scen, c) == trained


def test_general_without_recurrence_is_disjoint():
    general = scenario(setup="general", tasks=5, recur_prob=0.0)
    disjoint = scenario(setup="disjoint", tasks=5)
    assert general.class_order == disjoint.class_order
    for g, d in zip(general.tasks, disjoint.tasks, strict=True):
        assert g.train_classes == d.train_classes
        assert set(TRAIN[g.train_items]) == set(TRAIN[d.train_items])
        assert len(g.train_items) == len(d.train_items)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("setup", ["disjoint", "blurry", "general"])
def test_deterministic_by_seed(setup):
    a = scenario(seed=5, setup=setup, tasks=5, recur_prob=0.5)
    b = scenario(seed=5, setup=setup, tasks=5, recur_prob=0.5)
    assert a.digest() == b.digest()
    c = scenario(seed=6, setup=setup, tasks=5, recur_prob=0.5)
    assert c.class_order != a.class_order
    assert c.digest() != a.digest()


def test_json_round_trip():
    scen = scenario(setup="general", tasks=4, recur_prob=0.5)
    text = json.dumps(scen.to_json())
    again = Scenario.from_json(json.loads(text))
    assert again.digest() == scen.digest()
    assert again.class_order == scen.class_order and again.num_tasks == 4
    np.testing.assert_array_equal(again.tasks[2].train_items, scen.tasks[2].train_items)


# ---------------------------------------------------------------- truncation, subsampling


@pytest.mark.parametrize("setup", ["disjoint", "blurry", "general"])
def test_max_tasks_truncates(setup):
    full = scenario(setup=setup, tasks=5, recur_prob=0.5)
    short = scenario(setup=setup, tasks=5, recur_prob=0.5, max_tasks=2)
    assert short.num_tasks == 2 and short.class_order == full.class_order
    for s, f in zip(short.tasks, full.tasks[:2], strict=False):
        assert s.new_classes == f.new_classes and s.seen_classes == f.seen_classes
        np.testing.assert_array_equal(s.train_items, f.train_items)
        np.testing.assert_array_equal(s.gallery_items, f.gallery_items)
    np.testing.assert_array_equal(
        short.eval_items, np.sort(np.concatenate([t.gallery_items for t in short.tasks]))
    )
    assert scenario(tasks=5, max_tasks=9).num_tasks == 5  # larger than tasks: all of them


def test_per_class_subsampling():
    scen = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=5), seed=0,
                          train_per_class=7, test_per_class=3)  # fmt: skip
    items = np.concatenate([t.train_items for t in scen.tasks])
    assert len(np.unique(items)) == len(items) == 70
    assert np.bincount(TRAIN[items]).tolist() == [7] * CLASSES
    assert np.bincount(TEST[scen.eval_items]).tolist() == [3] * CLASSES
    again = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=5), 0, 7, 3)
    assert again.digest() == scen.digest()


def test_subsample_per_class_golden():
    labels = np.array([0, 1, 0, 2, 0, 1])
    rng = np.random.default_rng(0)
    keep = subsample_per_class(labels, 2, rng)
    assert np.bincount(labels[keep]).tolist() == [2, 2, 1]
    assert np.all(np.diff(keep) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(subsample_per_class(labels, None, rng), np.arange(6))


# ---------------------------------------------------------------- errors


def test_too_many_tasks_names_field():
    with pytest.raises(ValueError, match="scenario.tasks: 11 tasks but only 10 classes"):
        scenario(tasks=11)
    with pytest.raises(ValueError, match="scenario.classes_per_task"):
        scenario(tasks=4, classes_per_task=3)
    with pytest.raises(ValueError, match="scenario.first_task_classes: 8 classes"):
        scenario(tasks=5, first_task_classes=8)


# ---------------------------------------------------------------- held-out classes


def test_heldout_classes_are_never_trained_and_keep_their_test_items():
    scen = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), seed=0, heldout=3)
    full = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), seed=0)
    assert len(scen.heldout_classes) == 3
    # the held-out classes are the last 3 of the seeded order (same shuffle as without them)
    assert scen.heldout_classes == full.class_order[-3:]
    assert scen.class_order == full.class_order[:-3]
    for t in scen.tasks:
        assert not set(TRAIN[t.train_items]) & set(scen.heldout_classes)
        assert not set(TEST[t.gallery_items]) & set(scen.heldout_classes)
    assert set(scen.classes) | set(scen.heldout_classes) == set(range(CLASSES))
    np.testing.assert_array_equal(
        scen.heldout_items, np.flatnonzero(np.isin(TEST, scen.heldout_classes))
    )
    assert not set(scen.heldout_items) & set(scen.eval_items)


def test_heldout_items_are_subsampled_like_the_evaluation_set():
    scen = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), 0, 50, 5, heldout=2)
    assert len(scen.heldout_items) == 2 * 5
    assert np.bincount(TEST[scen.eval_items]).max() == 5


def test_heldout_json_round_trip_and_digest_stability():
    scen = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), seed=0, heldout=2)
    again = Scenario.from_json(json.loads(json.dumps(scen.to_json())))
    assert again.heldout_classes == scen.heldout_classes
    np.testing.assert_array_equal(again.heldout_items, scen.heldout_items)
    assert again.digest() == scen.digest()
    # without held-out classes the JSON (and so the digest) has no new keys: old files load
    plain = build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), seed=0)
    d = plain.to_json()
    assert "heldout_classes" not in d and "heldout_items" not in d
    old = Scenario.from_json(d)
    assert old.heldout_classes == () and old.heldout_items.shape == (0,)
    assert old.digest() == plain.digest() != scen.digest()


def test_too_many_heldout_classes_names_the_field():
    with pytest.raises(ValueError, match="scenario.heldout_classes: holding out 7 of 10"):
        build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), seed=0, heldout=7)
    with pytest.raises(ValueError, match="scenario.heldout_classes"):
        build_scenario(TRAIN, TEST, ScenarioConfig(tasks=4), seed=0, heldout=-1)


def test_general_long_sequence_has_more_tasks_than_classes():
    """50 tasks of 10 classes: one class introduced per task over the first 10, recurrences
    only after; every task trains on something; every training item once; seeded."""
    scen = scenario(setup="general", tasks=50, recur_prob=0.1)
    assert scen.num_tasks == 50
    assert [len(t.new_classes) for t in scen.tasks] == [1] * 10 + [0] * 40
    assert all(len(t.train_classes) >= 1 for t in scen.tasks)
    assert_partition([t.train_items for t in scen.tasks], np.arange(len(TRAIN)))
    assert scen.tasks[-1].seen_classes == scen.tasks[9].seen_classes and len(scen.classes) == 10
    assert scenario(setup="general", tasks=50, recur_prob=0.1).digest() == scen.digest()
    for t in scen.tasks[10:]:  # the gallery grows with every task that trains a class
        assert set(TEST[t.gallery_items]) <= set(t.train_classes)


def test_data_incremental_trains_every_class_with_new_items_each_task():
    scen = scenario(setup="data", tasks=25)  # 30 test items of each class: one+ per task
    classes = set(np.unique(TRAIN).tolist())
    assert scen.tasks[0].new_classes and all(not t.new_classes for t in scen.tasks[1:])
    assert all(set(t.train_classes) == classes for t in scen.tasks)
    assert_partition([t.train_items for t in scen.tasks], np.arange(len(TRAIN)))
    sizes = [len(t.train_items) for t in scen.tasks]
    assert max(sizes) - min(sizes) <= len(classes)  # an even share of each class per task
    assert all(set(TEST[t.gallery_items]) == classes for t in scen.tasks)
    assert_partition([t.gallery_items for t in scen.tasks], np.arange(len(TEST)))


def test_long_sequences_are_checked_at_load_time():
    from distcl.data.scenario import check_class_split

    check_class_split(ScenarioConfig(setup="general", tasks=50), 10)  # fine
    check_class_split(ScenarioConfig(setup="data", tasks=200), 10)  # fine
    with pytest.raises(ValueError, match="scenario.tasks: 50 tasks but only 10 classes"):
        check_class_split(ScenarioConfig(setup="disjoint", tasks=50), 10)

"""Pareto search, shared base task and seed confirmation: the pure parts (no Ray cluster).

Run: ``.venv/bin/python -m pytest tests/test_tune_pareto.py -q`` (a few seconds).
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from distcl.config import ConfigError, parse_job
from distcl.tune.base import base_plan, later_only, task0_key
from distcl.tune.confirm import summarize
from distcl.tune.pareto import (
    ParetoASHA,
    asha_milestones,
    dominates,
    front_indices,
    keep_at_rung,
    pareto_mask,
    pick_best,
    pick_weights,
)
from distcl.tune.results import best_row, make_row, mark_front, write_table
from distcl.tune.space import search_metrics, validate_tune


# ---------------------------------------------------------------- dominance and fronts
def test_dominance_golden():
    assert dominates((0.5, 0.5), (0.4, 0.5)) and not dominates((0.5, 0.5), (0.5, 0.5))
    assert not dominates((0.6, 0.1), (0.5, 0.5)) and not dominates((0.5, 0.5), (0.6, 0.1))
    pts = [(0.3, 0.1), (0.2, 0.4), (0.1, 0.0), (0.3, 0.1), (0.05, 0.05)]
    assert front_indices(pts) == [0, 0, 1, 0, 1]  # equal points share a front
    assert pareto_mask(pts) == [True, True, False, True, False]


@pytest.mark.parametrize("seed", range(5))
def test_front_against_brute_force(seed):
    """The front is exactly the points no other point dominates, in 2 and 3 objectives."""
    rng = np.random.default_rng(seed)
    for d in (2, 3):
        pts = [tuple(p) for p in np.round(rng.random((20, d)), 1)]  # ties on purpose
        mask = pareto_mask(pts)
        for i, p in enumerate(pts):
            dominated = any(dominates(q, p) for q in pts)
            assert mask[i] == (not dominated)
        fronts = front_indices(pts)
        for i, j in itertools.permutations(range(len(pts)), 2):
            if dominates(pts[i], pts[j]):
                assert fronts[i] < fronts[j]


@pytest.mark.parametrize(
    ("pick", "expected"),
    [(None, (0.5, 0.5)), ("am", (1.0, 0.0)), ("ac", (0.0, 1.0)), ("3,1", (0.75, 0.25))],
)
def test_pick_weights(pick, expected):
    assert pick_weights(pick, ("am", "ac")) == pytest.approx(expected)


@pytest.mark.parametrize("pick", ["bc", "1,2,3", "-1,2", "0,0", "x,y"])
def test_pick_weights_rejects(pick):
    with pytest.raises(ValueError, match="tune.pick"):
        pick_weights(pick, ("am", "ac"))


def test_pick_best_stays_on_the_front():
    pts = [(0.30, 0.0), (0.20, 0.5), (0.10, 0.9), (0.15, 0.4), (float("nan"), 1.0)]
    assert pick_best(pts, (1.0, 0.0)) == 0  # best AM
    assert pick_best(pts, (0.0, 1.0)) == 2  # best AC (the NaN point never wins)
    assert pick_best(pts, (0.5, 0.5)) == 2  # 0.5 > 0.35 > 0.15
    assert pick_best(pts, (0.8, 0.2)) in (0, 1, 2) and pick_best([], (1.0,)) is None


# ---------------------------------------------------------------- Pareto ASHA
def test_keep_at_rung_golden():
    assert keep_at_rung((0.1, 0.1), [], 2)  # the first at a rung continues
    assert not keep_at_rung((0.1, 0.1), [(0.5, 0.5)], 2)  # dominated
    assert keep_at_rung((0.6, 0.1), [(0.5, 0.5)], 2)  # a trade-off: both on the front
    # rf=2, 4 points: the best ceil(4/2) = 2 places; fronts [0, 1, 1, 2] -> keep front <= 1
    rec = [(0.9, 0.9), (0.5, 0.6), (0.1, 0.1)]
    assert keep_at_rung((0.6, 0.5), rec, 2) and not keep_at_rung((0.05, 0.05), rec, 2)


def test_asha_milestones():
    assert asha_milestones(10, 3, 2) == [6, 3]
    assert asha_milestones(3, 1, 2) == [2, 1] and asha_milestones(1, 1, 2) == []


def test_pareto_asha_grades_task_reports_only(tmp_path):
    import json

    asha = ParetoASHA("tasks_done", ["obj_am", "obj_ac"], max_t=3, grace_period=1,
                      reduction_factor=2)  # fmt: skip
    trial = lambda i: SimpleNamespace(trial_id=i, has_reported_at_least_once=False)  # noqa: E731
    a, b, c = trial("a"), trial("b"), trial("c")
    for t in (a, b, c):
        asha.on_trial_add(None, t)
    epoch = {"task": 0, "epoch": 1, "loss/ce": 1.0}  # a per-epoch report: not graded
    assert asha.on_trial_result(None, a, epoch) == "CONTINUE"
    assert asha.on_trial_result(None, a, {"tasks_done": 1, "obj_am": 0.5, "obj_ac": 0.5}) == (
        "CONTINUE"
    )
    assert asha.on_trial_result(None, b, {"tasks_done": 1, "obj_am": 0.4, "obj_ac": 0.4}) == (
        "STOP"
    )
    assert asha.on_trial_result(None, c, {"tasks_done": 1, "obj_am": 0.6, "obj_ac": 0.1}) == (
        "CONTINUE"
    )  # on the rung's front
    # Restored: a new scheduler re-reads a trial's result.json into its rungs.
    (tmp_path / "result.json").write_text(
        json.dumps({"tasks_done": 1, "obj_am": 0.9, "obj_ac": 0.9}) + "\n{cut"
    )
    again = ParetoASHA("tasks_done", ["obj_am", "obj_ac"], 3, 1, 2)
    old = SimpleNamespace(trial_id="old", has_reported_at_least_once=True, path=str(tmp_path),
                          local_path=str(tmp_path))  # fmt: skip
    again.on_trial_add(None, old)
    new = trial("new")
    again.on_trial_add(None, new)
    assert again.on_trial_result(None, new, {"tasks_done": 1, "obj_am": 0.5,
                                             "obj_ac": 0.5}) == "STOP"  # fmt: skip


# ---------------------------------------------------------------- rows, front and best
def _rows(objectives=("am", "ac")):
    def row(tid, tasks, am, ac, error=None):
        metrics = {
            "tasks_done": tasks,
            "objective": am,
            "am": am,
            "ac": ac,
            "obj_am": am,
            "obj_ac": ac,
            "bc": -0.1,
            "fc": 0.0,
            "base": "shared",
        }
        return make_row(tid, {"train.lr": 0.1}, metrics, error, 3, objectives)  # fmt: skip

    return [row("a", 3, 0.30, 0.0), row("b", 3, 0.20, 0.5), row("c", 3, 0.25, 0.2),
            row("d", 3, 0.10, 0.4), row("e", 1, 0.90, 1.0),
            row("f", 0, math.nan, math.nan, RuntimeError("boom"))]  # fmt: skip


def test_front_marked_without_a_dominated_trial(tmp_path):
    rows = _rows()
    mark_front(rows, ("am", "ac"), "am")
    front = {r["trial"] for r in rows if r["front"] == "yes"}
    assert front == {"a", "b", "c"}  # d is dominated by b; e stopped early (1 task)
    comparable = [r for r in rows if r["tasks"] == 3]
    for r in comparable:
        beaten = any(dominates((o["am"], o["ac"]), (r["am"], r["ac"])) for o in comparable)
        assert (r["front"] == "yes") == (not beaten)
    assert best_row(rows, ("am", "ac"), "am")["trial"] == "a"
    assert best_row(rows, ("am", "ac"), "ac")["trial"] == "b"
    assert best_row(rows, ("am", "ac"), "0.5,0.5")["trial"] == "b"  # 0.35 > 0.225 > 0.15
    text = write_table(rows, ["train.lr"], tmp_path, ("am", "ac"))
    assert text.splitlines()[0].startswith("| trial | status | tasks | front | objective |")
    assert "Pareto front" in text and "shared" in text
    header = (tmp_path / "trials.csv").read_text().splitlines()[0]
    assert header.endswith("train.lr,obj_am,obj_ac,error")


def test_single_objective_from_objectives_list():
    rows = _rows(("bc",))
    for r in rows:
        r["obj_bc"] = {"a": 0.1, "b": -0.2, "c": 0.3, "d": 0.0}.get(r["trial"], math.nan)
    assert best_row(rows, ("bc",))["trial"] == "c"


# ---------------------------------------------------------------- tune block checks
def _job(tmp_path, synthetic_raw_job, method, tune, **kw):
    raw = synthetic_raw_job(tmp_path, name="tiny", method=method, **kw)
    raw["tune"] = tune
    return parse_job(raw)


def test_objectives_and_pick_validate(tmp_path, synthetic_raw_job):
    space = {"method.params.alpha": {"type": "uniform", "low": 0.1, "high": 2.0}}
    job = _job(tmp_path, synthetic_raw_job, {"name": "lwf"},
               {"space": space, "objectives": ["am", "ac"], "pick": "0.7,0.3"})  # fmt: skip
    assert search_metrics(validate_tune(job)) == ["obj_am", "obj_ac"]
    with pytest.raises(ConfigError, match="tune.pick"):
        validate_tune(
            _job(
                tmp_path,
                synthetic_raw_job,
                {"name": "lwf"},
                {"space": space, "objectives": ["am", "ac"], "pick": "bc"},
            )
        )
    with pytest.raises(ConfigError, match="tune.pick: chooses"):
        validate_tune(
            _job(tmp_path, synthetic_raw_job, {"name": "lwf"}, {"space": space, "pick": "am"})
        )
    with pytest.raises(ConfigError, match="appears twice"):
        _job(tmp_path, synthetic_raw_job, {"name": "lwf"},
             {"space": space, "objectives": ["am", "am"]})  # fmt: skip
    with pytest.raises(ConfigError, match="tune.objectives"):
        _job(tmp_path, synthetic_raw_job, {"name": "lwf"},
             {"space": space, "objectives": ["am", "cmc"]})  # fmt: skip


# ---------------------------------------------------------------- shared base: which keys
@pytest.mark.parametrize(
    ("method", "train", "key", "space", "shared"),
    [
        ({"name": "cl2r", "params": {"lambda": 1.0}}, {}, "method.params.lambda",
         {"type": "loguniform", "low": 0.1, "high": 10}, True),
        ({"name": "cl2r"}, {}, "method.params.replay_fraction",
         {"type": "uniform", "low": 0.25, "high": 0.75}, True),
        ({"name": "cl2r"}, {}, "method.params.replay_fraction",
         {"type": "choice", "values": [0.0, 0.5]}, False),  # 0: no memory after task 0
        ({"name": "lwf"}, {}, "method.params.alpha", {"type": "uniform", "low": 0, "high": 2},
         True),
        ({"name": "cvs"}, {}, "method.params.temperature",
         {"type": "uniform", "low": 0.03, "high": 0.1}, False),  # the head's temperature
        ({"name": "mmd"}, {}, "method.params.margin",
         {"type": "uniform", "low": 0.1, "high": 0.5}, False),  # batch-hard triplet: task 0
        ({"name": "bct", "params": {"old_model_dir": "/m"}}, {}, "method.params.lambda",
         {"type": "uniform", "low": 0.1, "high": 2}, False),  # an old model at task 0
        ({"name": "lwf"}, {}, "train.later_lr", {"type": "uniform", "low": 0.01, "high": 0.1},
         True),
        ({"name": "lwf"}, {}, "train.lr", {"type": "uniform", "low": 0.01, "high": 0.1}, False),
        ({"name": "lwf"}, {}, "train.epochs", {"type": "choice", "values": [1, 2]}, False),
        ({"name": "lwf"}, {"first_task_epochs": 2}, "train.epochs",
         {"type": "choice", "values": [1, 2]}, True),
        ({"name": "lwf"}, {}, "seed", {"type": "choice", "values": [0, 1]}, False),
    ],
)  # fmt: skip
def test_later_only_keys(tmp_path, synthetic_raw_job, method, train, key, space, shared):
    job = _job(tmp_path, synthetic_raw_job, method, {"space": {key: space}}, train=train)
    s = job.tune.space[key]
    assert (later_only(job, key, s) is None) == shared
    ok, why = base_plan(job, job.tune.space, "auto")
    assert ok == shared and why
    assert base_plan(job, job.tune.space, "no")[0] is False
    if not shared:
        with pytest.raises(ConfigError, match="tune.shared_base: yes"):
            base_plan(job, job.tune.space, "yes")


def test_task0_key_ignores_only_the_later_keys(tmp_path, synthetic_raw_job):
    from distcl.tune.space import base_dict, trial_job

    space = {"method.params.alpha": {"type": "uniform", "low": 0.0, "high": 2.0}}
    job = _job(tmp_path, synthetic_raw_job, {"name": "lwf"}, {"space": space})
    base = base_dict(job)
    a = trial_job(base, {"method.params.alpha": 0.3}, "tiny-trial-a")
    b = trial_job(base, {"method.params.alpha": 1.7}, "tiny-trial-b")
    keys = list(space)
    assert task0_key(a, keys) == task0_key(b, keys) == task0_key(job, keys)
    c = trial_job(base, {"method.params.alpha": 0.3, "train.lr": 0.01}, "tiny-trial-c")
    assert task0_key(c, keys) != task0_key(a, keys)
    assert task0_key(a, []) != task0_key(b, [])


# ---------------------------------------------------------------- confirmation verdicts
def test_confirm_summary_calls_an_improvement_only_beyond_the_spread():
    values = {
        "best": {0: {"am": 0.40, "ac": 0.10}, 1: {"am": 0.42, "ac": 0.30}},
        "baseline": {0: {"am": 0.30, "ac": 0.20}, 1: {"am": 0.31, "ac": 0.10}},
    }
    s = summarize(values, ["am", "ac"])
    assert s["am"]["best"]["mean"] == pytest.approx(0.41)
    assert s["am"]["best"]["spread"] == pytest.approx(np.std([0.40, 0.42], ddof=1))
    assert s["am"]["diff"]["per_seed"] == pytest.approx({0: 0.10, 1: 0.11})
    assert s["am"]["verdict"].startswith("improvement")
    assert s["ac"]["verdict"].startswith("within the spread")  # +0.05 against 0.14 spread
    one = summarize({"best": {0: {"am": 0.5}}, "baseline": {0: {"am": 0.1}}}, ["am"])
    assert one["am"]["verdict"].startswith("one seed") and one["am"]["best"]["spread"] == 0.0

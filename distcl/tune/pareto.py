"""Pareto helpers of a multi-objective search (every objective maximised): dominance, the
non-dominated fronts, the trade-off a user picks, and the rung rule of :class:`ParetoASHA`.

    fronts = front_indices([(0.3, 0.1), (0.2, 0.4), (0.1, 0.0)])   # [0, 0, 1]
    weights = pick_weights("am", ("am", "ac"))                      # (1.0, 0.0)

Pure Python + numpy, no Ray (the scheduler class imports Ray Tune's base class only).
Test: ``.venv/bin/python -m pytest tests/test_tune_pareto.py -q``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b``: at least as good on every objective, better on one (max)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def front_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Non-dominated sorting: 0 for the Pareto front, 1 for the front once it is removed,
    ... (O(n^2) per front: searches have tens of trials)."""
    left = set(range(len(points)))
    out = [0] * len(points)
    level = 0
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        for i in front:
            out[i] = level
        left -= front
        level += 1
    return out


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """True where a point is on the Pareto front (no other point dominates it)."""
    return [f == 0 for f in front_indices(points)]


def pick_weights(pick: str | None, objectives: Sequence[str]) -> tuple[float, ...]:
    """Weights of the trade-off ``pick``: a metric name (all weight on it), ``"w1,w2,..."``
    (one non-negative weight per objective, normalised to sum 1), or None (equal weights).
    ValueError naming ``tune.pick`` otherwise."""
    n = len(objectives)
    if pick is None or str(pick).strip() == "":
        return tuple(1.0 / n for _ in objectives)
    text = str(pick).strip()
    if text in objectives:
        return tuple(1.0 if o == text else 0.0 for o in objectives)
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"tune.pick: {text!r} is neither one of {list(objectives)} nor {n} "
            f"comma-separated weights"
        ) from None
    if len(w) != n or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ValueError(
            f"tune.pick: {text!r} needs {n} non-negative weights (one per objective "
            f"{list(objectives)}), not all zero"
        )
    return tuple(x / sum(w) for x in w)


def pick_best(points: Sequence[Sequence[float]], weights: Sequence[float]) -> int | None:
    """Index of the front point with the highest weighted sum (ties: the earlier point);
    a point with a NaN objective never wins. None for no points."""
    ok = [i for i, p in enumerate(points) if not any(math.isnan(x) for x in p)]
    if not ok:
        return None
    mask = pareto_mask([points[i] for i in ok])
    front = [i for i, m in zip(ok, mask, strict=True) if m]
    score = {i: sum(w * x for w, x in zip(weights, points[i], strict=True)) for i in front}
    # On equal weighted sums prefer the point that is better on the heaviest objective.
    heavy = max(range(len(weights)), key=lambda k: weights[k])
    return max(front, key=lambda i: (round(score[i], 12), points[i][heavy], -i))


def keep_at_rung(point: Sequence[float], recorded: Sequence[Sequence[float]], rf: int) -> bool:
    """ASHA's rung rule for several objectives: a trial continues when its non-dominated
    front (among the trials recorded at the rung and itself) is no worse than the front of
    the ceil(n / rf)-th best; a whole front is kept or stopped together (like ASHA's ties),
    so a trial on the rung's Pareto front is never stopped."""
    if not recorded:
        return True
    pts = [tuple(p) for p in recorded] + [tuple(point)]
    fronts = front_indices(pts)
    k = math.ceil(len(pts) / rf)
    return fronts[-1] <= sorted(fronts)[k - 1]


def reported_results(trial: Any, time_attr: str, metrics: Sequence[str]) -> Iterator[tuple]:
    """(time, (m1, m2, ...)) of every result a restored trial reported (Tune's result.json,
    read where the experiment is stored: a folder or an object store)."""
    if not getattr(trial, "has_reported_at_least_once", False):
        return
    for line in _result_json(trial).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        values = [row.get(m) for m in metrics]
        if row.get(time_attr) is not None and all(
            v is not None and not math.isnan(v) for v in values
        ):
            yield row[time_attr], tuple(values)


def _result_json(trial: Any) -> str:
    """The text of the trial's result.json: from the experiment's storage, else the driver's
    staging folder ("" when neither has one)."""
    try:
        fs, path = trial.storage.storage_filesystem, f"{trial.path}/result.json"
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (AttributeError, RuntimeError, TypeError, OSError):  # no storage, no file
        pass
    try:
        local = Path(trial.local_path) / "result.json"
    except (RuntimeError, TypeError):
        return ""
    return local.read_text() if local.is_file() else ""


def asha_milestones(max_t: int, grace: int, rf: int) -> list[int]:
    """ASHA's rungs (tasks), highest first: grace * rf**k below max_t."""
    out, m = [], grace
    while m < max_t:
        out.append(m)
        m *= rf
    return sorted(out, reverse=True)


def _scheduler_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class ParetoASHA(_scheduler_base()):
    """ASHA by task index over several objectives (see :func:`keep_at_rung`).

    Grades only results that carry ``time_attr`` and every metric (the per-task reports);
    rungs survive ``Tuner.restore`` (restored trials' reports are re-read on add).
    """

    def __init__(self, time_attr: str, metrics: Sequence[str], max_t: int, grace_period: int,
                 reduction_factor: int):  # fmt: skip
        super().__init__()
        self._time_attr, self._metrics = time_attr, tuple(metrics)
        self._max_t, self._rf = max_t, reduction_factor
        self._rungs = [(m, {}) for m in asha_milestones(max_t, grace_period, reduction_factor)]

    def on_trial_add(self, tune_controller, trial) -> None:
        for t, values in reported_results(trial, self._time_attr, self._metrics):
            self._decide(trial.trial_id, t, values)

    def _decide(self, trial_id: str, t: float, values: tuple) -> str:
        for milestone, recorded in self._rungs:  # highest first
            if t < milestone:
                continue
            if trial_id in recorded:  # decided at this rung already
                return self.CONTINUE
            keep = keep_at_rung(values, list(recorded.values()), self._rf)
            recorded[trial_id] = values
            return self.CONTINUE if keep else self.STOP
        return self.CONTINUE

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result or any(m not in result for m in self._metrics):
            return self.CONTINUE
        values = tuple(float(result[m]) for m in self._metrics)
        if any(math.isnan(v) for v in values):
            return self.CONTINUE
        return self._decide(trial.trial_id, result[self._time_attr], values)

    def debug_string(self) -> str:
        return "ParetoASHA: " + " | ".join(f"{m}: {len(r)}" for m, r in self._rungs)

"""The ``tune:`` block of a job: search space, trial jobs and the objective.

A space key is a dotted config path (``method.params.lambda``, ``train.lr``); each trial is
the base job with the sampled values set at those paths. Everything here is checked before
any trial starts: a key that is not a config field, or a value the config refuses, is a
:class:`~distcl.config.ConfigError` naming the key.

Objective (``tune.objective``), read from the compatibility matrix of tasks 0..t (of the
protocol ``tune.protocol``; its main metric, ``eval.metric`` for retrieval protocols):
    ac        AC
    am        AM
    am_if_ac  AM if AC >= ac_floor, else AM - 1 (any trial meeting the floor beats every
              trial missing it; among either group, higher AM wins)
With one model (after the first task) AC has no pair to judge: it is reported as NaN and the
objective treats it as vacuously met (AC = 1), so ``ac`` ties every trial at task 1 and
``am_if_ac`` equals AM there. ASHA should then grade ``ac`` objectives from task 2 on
(``grace_tasks >= 2``).

Pareto search (``tune.objectives``: two or more of ac, am, bc, fc; all maximised): each is
reported as ``obj_<m>``, with the one-model NaN read as AC = 1 and BC = FC = 0 (no pair
yet). ``tune.pick`` (or ``--pick``) names the trade-off ``best.yaml`` is written for.

Pure Python (imports Ray Tune only inside :func:`param_space`).
Test: ``.venv/bin/python -m pytest tests/test_tune.py -q -k "not ray"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distcl import config
from distcl.config import ConfigError, JobConfig, SearchSpace, TuneConfig, parse_job, to_dict

#: Fields a search may not touch: they place the run, not train it.
FORBIDDEN_PREFIXES = ("name", "output", "tune", "smoke")


def _native(value: Any) -> Any:
    """Plain Python scalars (numpy values from samplers would not survive JSON/YAML)."""
    return value.item() if hasattr(value, "item") else value


def set_path(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"`` (missing sections are created,
    so that :func:`parse_job` names an unknown key instead of this function)."""
    config.set_path(raw, key, _native(value), f"tune.space.{key}")


def base_dict(job: JobConfig, resolve_paths: bool = True, cwd: Path | None = None) -> dict:
    """The job as a plain dict without its ``tune`` block, with ``tune.workers_per_trial``
    applied and (``resolve_paths``) relative paths made absolute against ``cwd`` (trial
    processes run in other folders)."""
    raw = to_dict(job)
    tune_cfg = raw.pop("tune", None) or {}
    raw["smoke"] = False  # already merged into the fields; merging again would undo a search
    if tune_cfg.get("workers_per_trial"):
        raw["train"]["workers"] = tune_cfg["workers_per_trial"]
    cwd = Path(cwd or Path.cwd())
    for section, key in (("data", "root"), ("data", "shards_dir"), ("output", "root")):
        if resolve_paths and raw[section].get(key):
            raw[section][key] = str((cwd / raw[section][key]).resolve())
    return raw


def trial_job(
    base: Mapping[str, Any], params: Mapping[str, Any], name: str, output_root: str | None = None
) -> JobConfig:
    """The base job with ``params`` (dotted keys) set, renamed ``name``, under ``output_root``."""
    raw = json.loads(json.dumps(base))
    for key, value in params.items():
        set_path(raw, key, value)
    raw["name"] = name
    raw.pop("tune", None)
    raw["output"]["tracking"] = "none"  # a search's tracker logs trials (a child run each)
    if output_root is not None:
        raw["output"]["root"] = str(output_root)
    return parse_job(raw, f"trial {name}")


def _probe_values(key: str, s: SearchSpace) -> list[Any]:
    """Values that must all be valid config for ``key``: the bounds or every listed value."""
    where = f"tune.space.{key}"
    if s.type in ("uniform", "loguniform"):
        if s.low is None or s.high is None:
            raise ConfigError(f"{where}: {s.type} needs low and high")
        if s.values:
            raise ConfigError(f"{where}: {s.type} takes low/high, not values")
        if not s.low < s.high:
            raise ConfigError(f"{where}: low must be < high, got {s.low} >= {s.high}")
        if s.type == "loguniform" and s.low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {s.low}")
        return [s.low, s.high]
    if not s.values:
        raise ConfigError(f"{where}: {s.type} needs a non-empty list of values")
    if s.low is not None or s.high is not None:
        raise ConfigError(f"{where}: {s.type} takes values, not low/high")
    return list(s.values)


def validate_tune(job: JobConfig) -> TuneConfig:
    """Check the ``tune`` block and every space key against the config; return the block.

    Each key is set to each probe value (bounds, or every choice/grid value) on the base job
    and the result must load: a bad key or value is a ConfigError naming ``tune.space.<key>``.
    """
    tc = job.tune
    if tc is None:
        raise ConfigError(f"{job.name}: the job has no tune: block")
    if not tc.space:
        raise ConfigError("tune.space: no parameter to search")
    checks = {
        "tune.num_samples": tc.num_samples >= 1,
        "tune.max_concurrent_trials": tc.max_concurrent_trials == "auto"
        or tc.max_concurrent_trials >= 1,
        "tune.grace_tasks": tc.grace_tasks >= 1,
        "tune.reduction_factor": tc.reduction_factor >= 2,
        "tune.driver_cpus": tc.driver_cpus > 0,
        "tune.max_trial_failures": tc.max_trial_failures >= 0,
        "tune.ac_floor": 0.0 <= tc.ac_floor <= 1.0,
        "tune.workers_per_trial": tc.workers_per_trial is None or tc.workers_per_trial >= 1,
    }
    bounds = {"tune.num_samples": ">= 1", "tune.max_concurrent_trials": ">= 1",
              "tune.grace_tasks": ">= 1", "tune.reduction_factor": ">= 2",
              "tune.driver_cpus": "> 0 (Ray refuses a trial without CPU)",
              "tune.max_trial_failures": ">= 0", "tune.ac_floor": "in [0, 1]",
              "tune.workers_per_trial": ">= 1"}  # fmt: skip
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"{name}: must be {bounds[name]}")
    base = base_dict(job)
    if tc.start_with_job and tc.search == "grid":
        raise ConfigError(
            "tune.start_with_job: search 'grid' runs fixed combinations; list the job's "
            "values in the grid instead"
        )
    for key, s in tc.space.items():
        if key.split(".")[0] in FORBIDDEN_PREFIXES or not key or "" in key.split("."):
            raise ConfigError(
                f"tune.space.{key}: not a searchable config field "
                f"(name, output, tune and smoke place a run, not train it)"
            )
        if tc.search == "grid" and s.type in ("uniform", "loguniform"):
            raise ConfigError(
                f"tune.space.{key}: search 'grid' needs grid or choice values, not {s.type}"
            )
        if tc.search == "optuna" and s.type == "grid":
            raise ConfigError(
                f"tune.space.{key}: search 'optuna' samples; use choice, "
                f"not grid (or search: grid / random)"
            )
        for value in _probe_values(key, s):
            try:
                trial_job(base, {key: value}, f"{job.name}-probe")
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key} = {value!r}: {e}") from None
    if tc.pick is not None:
        if len(tc.objectives) < 2:
            raise ConfigError("tune.pick: chooses a trade-off of tune.objectives (two or more)")
        from distcl.tune.pareto import pick_weights

        try:
            pick_weights(tc.pick, tc.objectives)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if tc.start_with_job:
        job_point(job)
    return tc


def search_metrics(tc: TuneConfig) -> list[str]:
    """The reported keys the search maximises: ``objective``, or ``obj_<m>`` per metric of
    ``tune.objectives`` (a Pareto search when there are two or more)."""
    return [f"obj_{m}" for m in tc.objectives] if tc.objectives else ["objective"]


def job_point(job: JobConfig) -> dict[str, Any]:
    """The job's own value of every searched field (``tune.start_with_job``): the search's
    first point. A value outside its space is a ConfigError naming the field."""
    base = base_dict(job, resolve_paths=False)
    point: dict[str, Any] = {}
    for key, s in job.tune.space.items():
        node: Any = base
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(
                    f"tune.start_with_job: the job sets no value for tune.space.{key}"
                )
            node = node[part]
        if s.type in ("uniform", "loguniform"):
            ok = isinstance(node, (int, float)) and s.low <= node <= s.high
            where = f"[{s.low:g}, {s.high:g}]"
        else:
            ok = node in s.values
            where = f"{list(s.values)}"
        if not ok:
            raise ConfigError(
                f"tune.start_with_job: the job's {key} = {node!r} lies outside "
                f"tune.space.{key} {where}"
            )
        point[key] = node
    return point


def param_space(tc: TuneConfig) -> dict[str, Any]:
    """Ray Tune's ``param_space`` (flat dotted keys) for the space of ``tc``."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, s in tc.space.items():
        if s.type == "uniform":
            out[key] = tune.uniform(s.low, s.high)
        elif s.type == "loguniform":
            out[key] = tune.loguniform(s.low, s.high)
        elif s.type == "choice" and tc.search != "grid":
            out[key] = tune.choice(list(s.values))
        else:  # grid, or choice under search: grid
            out[key] = tune.grid_search(list(s.values))
    return out


def objective(ac: float, am: float, kind: str, ac_floor: float = 0.5) -> float:
    """The scalar a trial maximises (see the module docstring); ``ac`` may be NaN (one model)."""
    ac_eff = 1.0 if math.isnan(ac) else ac  # one model: no pair can be incompatible
    if kind == "ac":
        return ac_eff
    if kind == "am":
        return am
    if kind == "am_if_ac":
        return am if ac_eff >= ac_floor else am - 1.0
    raise ValueError(f"objective: {kind!r} is not one of ['ac', 'am', 'am_if_ac']")

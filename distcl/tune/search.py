"""``distcl tune JOB``: Ray Tune search of a job's loss weights against compatibility.

    distcl tune jobs/fashion_mnist/tune_cl2r.yaml        # embedded local Ray
    RAY_ADDRESS=auto distcl tune JOB                     # an existing cluster
    distcl submit JOB --tune --address http://HOST:8265  # the same, as a Ray job

    distcl tune JOB --pick am            # Pareto search: best.yaml for the best AM on the front
    distcl tune JOB --confirm 3          # then best and baseline again on 3 seeds each

The job's ``tune:`` block (``distcl.config.TuneConfig``) names the space (dotted config
paths: ``method.params.lambda``, ``train.lr``, ...), the search (optuna TPE, random, grid),
the objective (``ac``, ``am``, ``am_if_ac``) or, for a Pareto search, ``objectives`` (two or
more of ``ac``, ``am``, ``bc``, ``fc``, all maximised, searched with Optuna's multi-objective
TPE), the protocol whose matrix they are read from, trials, concurrency and ASHA.

A trial is ONE Ray Train run over its whole task sequence (``distcl.tune.trial``): the
workers report after every task, Tune hears those reports, and ASHA stops poor trials
between tasks (``time_attr="tasks_done"``, rungs at ``grace_tasks * rf**k`` tasks; a Pareto
search ranks the trials at a rung by non-dominated fronts, ``distcl.tune.pareto``). When no
tuned key acts on the first task, the first task is trained once for the whole search and
every trial starts from it (``distcl.tune.base``).

Everything lives in ``<output.root>/<job>-tune/`` (a folder every node mounts, or an
object-store prefix: Tune's state through its ``storage_filesystem``): ``tune_job.yaml``
(the job the folder belongs to), ``experiment/`` (Tune's state), ``trials/<job>-trial-<id>/``
(normal run dirs), ``trials/<job>-base/`` (the shared first task), ``trials.csv``, ``trials.md``,
``objective_vs_<param>.png`` (or ``pareto.png``), ``best.yaml`` and, with ``--confirm``,
``confirm.md``/``confirm.json`` and ``confirm/`` (run dirs ``<job>-best-<digest>-seed<s>``,
``<job>-baseline-seed<s>``).

Resources: a trial holds ``tune.driver_cpus`` (Tune refuses 0) plus, while it trains,
``workers * cpus_per_worker`` CPUs (fractions allowed: pack small models) and one GPU per
worker on GPU clusters, in its Train placement group. ``max_concurrent_trials: auto`` runs as
many trials as the cluster holds; a number is lowered, with a message, to what fits (more
would leave Train runs waiting for workers forever). A failed trial is retried
``tune.max_trial_failures`` times, then reported as a row with status ``error``.

Resume: starting the same command again restores the experiment (``Tuner.restore``):
finished trials are kept, interrupted ones continue after their last finished task
(finished models on disk are never retrained), errored ones are retried. Tune does not
save scheduler state, so :class:`TaskASHA` / ``ParetoASHA`` re-read the reported objectives
of restored trials (Tune's ``result.json``) into their rungs.

Test: ``.venv/bin/python -m pytest tests/test_tune.py -q`` (real Ray, a few minutes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from distcl import storage
from distcl.config import ConfigError, JobConfig, TuneConfig, dump_job, parse_job, to_dict
from distcl.storage import Loc
from distcl.tune.base import prepare_bases
from distcl.tune.groups import SweepIdleGroups
from distcl.tune.pareto import reported_results
from distcl.tune.space import (
    base_dict,
    job_point,
    param_space,
    search_metrics,
    trial_job,
    validate_tune,
)


# ------------------------------------------------------------------ scheduling helpers
class TaskASHA(ASHAScheduler):
    """ASHA whose rungs survive ``Tuner.restore``: Tune re-adds restored trials but does not
    save the scheduler, so each restored trial's reports are recorded again on add."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for t, (value,) in reported_results(trial, self._time_attr, (self._metric,)):
            bracket.on_result(trial, t, self._metric_op * value)


def max_concurrency(
    requested: int | str,
    driver_cpus: float,
    workers: int,
    cpus_per_worker: float,
    gpus: bool,
    cluster: Mapping[str, float],
    gpus_per_worker: float = 1.0,
) -> int:
    """How many trials can run together: ``requested`` ("auto": no limit of its own),
    lowered so that every running trial's driver and Train workers fit ``cluster``
    (``ray.cluster_resources()``); fractional CPUs and GPUs per worker pack trials.

    ValueError when not even one trial fits (its Train run would wait forever).
    """
    per_trial = driver_cpus + workers * cpus_per_worker
    cpus = float(cluster.get("CPU", 0.0))
    fit = math.floor(cpus / per_trial + 1e-9)
    if gpus:
        gpu_fit = float(cluster.get("GPU", 0.0)) / (workers * gpus_per_worker)
        fit = min(fit, math.floor(gpu_fit + 1e-9))
    if fit < 1:
        raise ValueError(
            f"one trial needs {per_trial:g} CPUs (tune.driver_cpus {driver_cpus:g} + "
            f"{workers} workers x train.cpus_per_worker {cpus_per_worker:g})"
            + (f" and {workers} GPUs" if gpus else "")
            + f" but the cluster has {cpus:g} CPUs"
            + (f", {cluster.get('GPU', 0):g} GPUs" if gpus else "")
            + ": lower tune.workers_per_trial or train.cpus_per_worker"
        )
    return fit if requested == "auto" else min(int(requested), fit)


def _trial_name(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def _searched(raw: dict) -> dict:
    """A job dict without the tune fields that only read a search's results (pick, the
    confirm seeds, concurrency): changing them between runs resumes the same search."""
    tune = dict(raw.get("tune") or {})
    for key in ("pick", "confirm_seeds", "max_concurrent_trials"):
        tune.pop(key, None)
    return {**raw, "tune": tune}


def _can_restore(exp_dir: Loc) -> bool:
    from ray import tune

    kw = storage.ray_storage(exp_dir)
    return tune.Tuner.can_restore(kw.pop("storage_path"), **kw)


def _check_same_tuning(job: JobConfig, tune_dir: Loc) -> None:
    """A tuning folder belongs to one job: restoring it under a changed job would mix
    trials of two searches (Tune restores its old space, the trials would get the new base)."""
    path = tune_dir / "tune_job.yaml"
    mine = _searched(to_dict(job))
    if storage.is_file(path) and storage.exists(tune_dir / "experiment"):
        import yaml

        raw = yaml.safe_load(storage.read_text(path))
        theirs = _searched(to_dict(parse_job(raw, str(path))))
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise ConfigError(
                f"{tune_dir}: holds a tuning run of a different job (fields differ: "
                f"{', '.join(diff)}); delete it or rename the job"
            )
    storage.write_text(path, dump_job(job))


def _warn_few_probes(job: JobConfig, tc: TuneConfig, scenario, log, floor: int = 50) -> None:
    """A search on an open protocol scores a few probes: say so when they are few (the
    reference search scored 4, so its matrix entries moved in steps of 0.25)."""
    if tc.protocol not in ("open", "identification"):
        return
    classes = len(scenario.heldout_classes or ()) - job.eval.distractor_classes
    probes = job.eval.probes_per_class * max(classes, 0)
    if probes < floor:
        log(f"warning: tune.protocol {tc.protocol} scores {probes} probes in all "
            f"(eval.probes_per_class {job.eval.probes_per_class} x {classes} held-out classes): "
            f"each matrix entry moves in steps of 1/{max(probes, 1)}; raise "
            "eval.probes_per_class")  # fmt: skip


def _cluster_concurrency(tc: TuneConfig, probe: JobConfig, log) -> tuple[int, bool]:
    """(trials at once, GPUs?) for this cluster."""
    import ray

    use_gpu = {"yes": True, "no": False}.get(probe.train.use_gpu)
    gpw = probe.train.gpus_per_worker
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= probe.train.workers * gpw
    cluster = ray.cluster_resources()
    concurrency = max_concurrency(tc.max_concurrent_trials, tc.driver_cpus, probe.train.workers,
                                  probe.train.cpus_per_worker, use_gpu, cluster, gpw)  # fmt: skip
    per = tc.driver_cpus + probe.train.workers * probe.train.cpus_per_worker
    if tc.max_concurrent_trials != "auto" and concurrency < tc.max_concurrent_trials:
        log(f"tune.max_concurrent_trials lowered from {tc.max_concurrent_trials} to "
            f"{concurrency}: each trial needs {per:g} CPUs, the cluster has "
            f"{cluster.get('CPU', 0):g}")  # fmt: skip
    else:
        log(f"{concurrency} trial(s) at once ({per:g} CPUs each, the cluster has "
            f"{cluster.get('CPU', 0):g})")  # fmt: skip
    return concurrency, use_gpu


def tune_job(
    job: JobConfig,
    num_cpus: int | None = None,
    log=print,
    report_only: bool = False,
    confirm: int | None = None,
    pick: str | None = None,
    best_from: JobConfig | None = None,
) -> dict[str, Any]:
    """Run (or resume) the search of ``job.tune``; write the table, plots and best job;
    then (``confirm`` K, default ``tune.confirm_seeds``) rerun best and baseline on K seeds.

    ``report_only``: run nothing; write the table, plots and best job of the trials stored so
    far (a tuning run that is still going, or was interrupted). Trials that have not reached
    the last task are then "stopped early or unfinished". ``pick`` overrides ``tune.pick``.
    ``best_from``: run no search; confirm this job's values of the searched keys (a
    ``best.yaml`` an earlier search wrote) against the job's own, on ``confirm`` seeds.

    Returns ``{"tune_dir", "rows", "best" (row or None), "best_job" (path or None),
    "confirm" (dict or None)}``. Failed trials are rows with status ``error``; ValueError if
    every trial failed.
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from distcl.data.shards import build_shards
    from distcl.train.driver import init_ray
    from distcl.train.progress import progress_board
    from distcl.tune.pareto import ParetoASHA, pick_weights
    from distcl.tune.trial import run_trial

    if pick is not None:
        job = job.model_copy(update={"tune": job.tune.model_copy(update={"pick": pick})})
    tc: TuneConfig = validate_tune(job)
    if tc.objectives:
        pick_weights(tc.pick, tc.objectives)  # a bad --pick fails before anything runs
    # A folder every node mounts, or an object-store prefix: Tune's state, the trials' run
    # dirs, the shared base and the tables all live under it.
    tune_dir = storage.location(job.output.root).resolve() / f"{job.name}-tune"
    storage.makedirs(tune_dir)
    _check_same_tuning(job, tune_dir)
    init_ray(num_cpus=num_cpus)

    base = base_dict(job)
    trials_root = tune_dir / "trials"
    # Shards once, before any trial: concurrent trials would race to build the same folder.
    probe = trial_job(base, {}, f"{job.name}-trial", str(trials_root))
    _, scenario, _ = build_shards(probe)
    num_tasks = scenario.num_tasks
    _warn_few_probes(job, tc, scenario, log)
    metrics = search_metrics(tc)
    exp_dir = tune_dir / "experiment"
    if report_only:
        trainable = tune.with_parameters(run_trial, base=base, trials_root=str(trials_root),
                                         job_name=job.name, tc=tc)  # fmt: skip
        if not _can_restore(exp_dir):
            raise ValueError(f"{exp_dir}: no tuning run to report on; run `distcl tune` first")
        kw = storage.ray_storage(exp_dir)
        grid = tune.Tuner.restore(kw.pop("storage_path"), trainable=trainable,
                                  **kw).get_results()  # fmt: skip
        return _write_results(job, tc, grid, num_tasks, tune_dir, log, partial=True)

    concurrency, _ = _cluster_concurrency(tc, probe, log)
    tracked = None
    if job.output.tracking == "mlflow" and best_from is None:  # a parent run, a child per trial
        from distcl.tracking import SideRun

        tracked = SideRun(job, f"{job.name}-tune", tune_dir / "tracking.json", log,
                          tags={"distcl.kind": "search"})  # fmt: skip
        raw = to_dict(job)
        tracked.log_params({"tune": raw["tune"], "method": raw["method"]})
    callbacks = [SweepIdleGroups()] + ([tracked.trial_callback(job)] if tracked else [])
    if best_from is not None:
        from distcl.tune.confirm import baseline_point, confirm_best

        k = tc.confirm_seeds if confirm is None else confirm
        if not k:
            raise ConfigError("--best: give the number of seeds with --confirm K")
        best = baseline_point(best_from, list(tc.space), what=f"--best ({best_from.name})")
        log(f"confirm: the values of {best_from.name}: {best} (no search)")
        out = {"tune_dir": str(tune_dir), "rows": [], "best": best, "best_job": None}
        out["confirm"] = confirm_best(job, tc, best, k, tune_dir, concurrency, log)
        return out
    shared_base, later = prepare_bases(job, tc, base, trials_root, [job.seed], log)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, trials_root=str(trials_root),
                             job_name=job.name, tc=tc, shared_base=shared_base,
                             later_keys=later,
                             board=progress_board()),
        tune.PlacementGroupFactory([{"CPU": tc.driver_cpus}]),
    )  # fmt: skip
    if _can_restore(exp_dir):
        log(f"resuming the tuning run in {exp_dir}")
        kw = storage.ray_storage(exp_dir)
        tuner = tune.Tuner.restore(kw.pop("storage_path"), trainable=trainable,
                                   resume_errored=True, **kw)  # fmt: skip
    else:
        points = [job_point(job)] if tc.start_with_job else None
        if points:
            log(f"trial 1 runs the job's own values: {points[0]}")
        modes = ["max"] * len(metrics)
        if tc.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            # Several metrics: Optuna's multi-objective TPE (one study, one direction each).
            search_alg = OptunaSearch(
                metric=metrics if len(metrics) > 1 else None,
                mode=modes if len(metrics) > 1 else None,
                seed=job.seed, points_to_evaluate=points,
            )  # fmt: skip
            limit = concurrency  # Tune wraps a Searcher in a ConcurrencyLimiter
        else:
            # A SearchGenerator ignores Tune's max_concurrent_trials: it limits itself.
            search_alg = BasicVariantGenerator(
                random_state=job.seed, max_concurrent=concurrency, points_to_evaluate=points
            )
            limit = None
        if tc.asha:
            if tc.grace_tasks >= num_tasks:
                log(f"ASHA: grace_tasks={tc.grace_tasks} >= {num_tasks} tasks, "
                    f"no trial can stop early")  # fmt: skip
            grace = min(tc.grace_tasks, num_tasks)
            if len(metrics) > 1:
                scheduler = ParetoASHA("tasks_done", metrics, num_tasks, grace,
                                       tc.reduction_factor)  # fmt: skip
            else:
                scheduler = TaskASHA(
                    time_attr="tasks_done",
                    max_t=num_tasks,
                    grace_period=grace,
                    reduction_factor=tc.reduction_factor,
                )
        else:
            scheduler = FIFOScheduler()
        if tc.search == "grid":
            log("search: grid runs every combination once (tune.num_samples is not used)")
        single = len(metrics) == 1
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(tc),
            tune_config=tune.TuneConfig(
                metric=metrics[0] if single else None, mode="max" if single else None,
                search_alg=search_alg, scheduler=scheduler,
                num_samples=1 if tc.search == "grid" else tc.num_samples,
                max_concurrent_trials=limit, reuse_actors=False,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=exp_dir.name, **storage.ray_storage(tune_dir),
                failure_config=tune.FailureConfig(max_failures=tc.max_trial_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks,
            ),
        )  # fmt: skip
    try:
        out = _write_results(job, tc, tuner.fit(), num_tasks, tune_dir, log)
    except BaseException:
        if tracked:
            tracked.finish("FAILED")
        raise
    if tracked:
        best = out["best"] or {}
        tracked.log_metrics({f"best.{k}": v for k, v in best.items()})
        tracked.tag_trials(out["rows"])
        tracked.log_artifacts(
            [
                tune_dir / n
                for n in ("trials.md", "trials.csv", "pareto.png", out["best_job"] or "")
            ]  # fmt: skip
            + sorted(Path(tune_dir).glob("objective_vs_*.png"))
        )
        tracked.finish()
    k = tc.confirm_seeds if confirm is None else confirm
    if k:
        from distcl.tune.confirm import confirm_best, finished_search_runs

        searched = finished_search_runs(job, out["rows"], list(tc.space), tune_dir, num_tasks)
        out["confirm"] = confirm_best(job, tc, out["best"], k, tune_dir, concurrency, log,
                                      searched=searched)  # fmt: skip
    return out


def _write_results(job, tc, grid, num_tasks, tune_dir, log, partial=False) -> dict[str, Any]:
    """Rows of every trial in ``grid``; the table, plots and best job written to tune_dir."""
    from distcl.tune.base import base_status
    from distcl.tune.results import (
        best_row,
        make_row,
        mark_front,
        plot_objective,
        plot_pareto,
        write_best,
        write_table,
    )

    params = list(tc.space)
    rows = []
    for r in grid:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or Path(r.path).name.removeprefix("trial-")
        row = make_row(trial_id, {p: (r.config or {}).get(p) for p in params}, metrics, r.error,
                       num_tasks, tc.objectives)  # fmt: skip
        row["base"] = base_status(tune_dir / "trials" / f"{job.name}-trial-{trial_id}")
        rows.append(row)
    if partial:
        for row in rows:
            if row["status"] == "stopped early":
                row["status"] = "stopped early or unfinished"
    if tc.start_with_job:  # name the baseline row
        point = job_point(job)
        for row in rows:
            if all(row.get(k) == v for k, v in point.items()):
                row["trial"] = f"{row['trial']} (job values)"
    if len(tc.objectives) > 1:
        mark_front(rows, tc.objectives, tc.pick)
    best = best_row(rows, tc.objectives, tc.pick)
    with storage.staged(tune_dir) as local:  # tune_dir itself, or uploaded there after
        text = write_table(rows, params, local, tc.objectives)
        log_params = [p for p, s in tc.space.items() if s.type == "loguniform"]
        plot_objective(rows, params, log_params, local)
        if len(tc.objectives) >= 2:
            plot_pareto(rows, tc.objectives, local)
        if best is not None:
            best_name = write_best(job, best, params, local).name
    what = (
        f"objectives {', '.join(tc.objectives)} (Pareto)"
        if len(tc.objectives) > 1
        else f"objective '{tc.objectives[0] if tc.objectives else tc.objective}'"
    )
    log(f"\n{job.name}: {len(rows)} trials, {what} on {job.eval.metric} "
        f"(protocol '{tc.protocol}'), {num_tasks} tasks\n{text}")  # fmt: skip
    out = {"tune_dir": str(tune_dir), "rows": rows, "best": best, "best_job": None,
           "confirm": None}  # fmt: skip
    if best is None:
        raise ValueError(
            f"all {len(rows)} trials failed before a report; see {tune_dir / 'trials.md'}"
        )
    out["best_job"] = str(tune_dir / best_name)
    log(f"best: trial {best['trial']} objective {best['objective']:.4f} -> {out['best_job']}")
    return out

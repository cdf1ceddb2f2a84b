"""A job from start to end: train every task, evaluate, report; and several jobs compared.

    distcl run JOB            ->  run_job(load_job(JOB))
    distcl compare JOB ...    ->  compare_jobs([...], out)

Training (``distcl.train``) and evaluation (``distcl.eval``) do not import each other: this
module sits above both and is the only place that strings them together. A tuning trial does
the same in its own way (``distcl.tune.trial``: it trains with a per-task scoring callback).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from distcl import faults, storage
from distcl.config import JobConfig
from distcl.rundir import RunDir


def run_job(job: JobConfig, progress: bool = True, evaluate: bool = True, log=print) -> dict:
    """Train every task of ``job`` (resuming), then evaluate it and write the report."""
    from distcl.localray import init_ray
    from distcl.tracking import RunTracker, mlflow_client, mlflow_uri
    from distcl.train.driver import Run

    if job.output.tracking == "mlflow":  # an unreachable tracker fails before Ray starts
        mlflow_client(mlflow_uri(job))
    t0 = time.perf_counter()
    init_ray()
    ray_s = time.perf_counter() - t0
    tracker = RunTracker.for_job(job, job.run_dir, log)
    run = Run(job, progress=progress, log=log, tracker=tracker)
    try:
        out = run.run()
        out["ray_start_s"] = ray_s
        if evaluate:
            from distcl.eval.evaluate import evaluate_run

            faults.pause_point(os.environ.get(faults.PAUSE_ENV), "eval",
                               run.scenario.num_tasks - 1)  # fmt: skip
            out["eval"] = evaluate_run(run.dir, log=log)
    except BaseException:
        if tracker is not None and (tracker.run_id or tracker.writer):
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        if evaluate:
            from distcl.tracking import run_artifacts

            tracker.log_eval(out["eval"])
            tracker.log_artifacts(run_artifacts(run.dir))
        tracker.finish()
    return out


def time_breakdown(out: dict, total_s: float) -> str:
    """Where a run's wall time went, from ``run_job``'s result: the fixed start-up (Ray, then
    the Train controller, workers and process group), the training steps, the end-of-task work
    (embedding, exemplars), the evaluation, and the rest (model set-up, shutdown, reports).
    A run slower than expected shows here which part grew: the training steps scale with the
    machine's speed, the start-up costs about the same whatever the job."""
    tasks = out.get("tasks", {}).values()
    parts = {
        "start-up": out.get("ray_start_s", 0.0) + out.get("run_overhead", {}).get("startup_s", 0.0),
        f"training ({len(tasks)} tasks)": sum(t.get("train_s", 0.0) for t in tasks),
        "end-of-task": sum(t.get("end_task_s", 0.0) for t in tasks),
        "evaluation": out.get("eval", {}).get("eval_s", 0.0),
    }
    parts["other"] = max(total_s - sum(parts.values()), 0.0)
    return ", ".join(f"{k} {v:.0f}s" for k, v in parts.items())


def with_seed(job: JobConfig, seed: int) -> JobConfig:
    """``job`` on another seed, in its own run dir (``<name>-s<seed>``)."""
    from distcl.config import parse_job, to_dict

    raw = {**to_dict(job), "seed": seed, "name": f"{job.name}-s{seed}"}
    return parse_job({**raw, "resolved": True}, f"{job.name} (seed {seed})")


def compare_jobs(
    jobs: list[JobConfig], out: Path, log=print, run: bool = True,
    seeds: list[int] | None = None, protocol: str | None = None,
) -> list[dict]:  # fmt: skip
    """Run (or resume) every job, then write the side-by-side table and figure
    (:func:`distcl.eval.compare.write_comparison`). ``run=False`` only reads each finished
    run's ``metrics.json``; ``seeds``: every job once per seed, cells as mean ± std;
    ``protocol``: the matrices of the figure."""
    from distcl.eval.compare import write_comparison

    variants = [[with_seed(j, s) for s in seeds] if seeds else [j] for j in jobs]
    for group in zip(*variants, strict=True):  # the jobs of one seed share its scenario
        if len({j.data_fingerprint() for j in group}) > 1:
            raise ValueError(
                "compare: the jobs do not share data/scenario/seed "
                f"({', '.join(j.name for j in group)}): their matrices are not comparable"
            )
    results = []
    for group in variants:
        runs = []
        for job in group:
            rd = RunDir(job.run_dir)
            if run:
                log(f"== {job.name} ({job.method.name}, seed {job.seed})")
                runs.append(run_job(job, progress=True, log=log)["eval"])
            elif not storage.is_file(rd.metrics_json):
                raise ValueError(
                    f"{rd.metrics_json}: no metrics (run the job first, or drop --no-run)"
                )
            else:
                runs.append(storage.read_json(rd.metrics_json))
        results.append((group, runs))
    rows = write_comparison(results, out, log=log, protocol=protocol)
    if jobs[0].output.tracking == "mlflow":  # the comparison as one run
        from distcl.tracking import SideRun

        tracked = SideRun(jobs[0], f"compare: {', '.join(j.name for j in jobs)}", None, log,
                          tags={"distcl.kind": "compare"})  # fmt: skip
        tracked.log_params({"jobs": [j.name for j in jobs], "seeds": seeds or [jobs[0].seed],
                            "protocol": protocol or "all"})  # fmt: skip
        for row in rows:  # cells: (mean, std, n) over the seeds
            cells = {k: v for k, v in row.items() if isinstance(v, tuple)}
            tracked.log_metrics(
                {f"{row['job']}.{k}": v[0] for k, v in cells.items()}
                | {f"{row['job']}.{k}.std": v[1] for k, v in cells.items()}
            )
        tracked.log_artifacts([Path(out) / n for n in ("compare.md", "compare.json",
                                                       "compare.png")])  # fmt: skip
        tracked.finish()
    return rows

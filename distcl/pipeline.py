"""A job from start to end: train every task, evaluate, report; and several jobs compared.

    distcl run JOB            ->  run_job(load_job(JOB))
    distcl compare JOB ...    ->  compare_jobs([...], out)

Training (``distcl.train``) and evaluation (``distcl.eval``) do not import each other: this
module sits above both and is the only place that strings them together. A tuning trial does
the same in its own way (``distcl.tune.trial``: it trains with a per-task scoring callback).
"""

from __future__ import annotations

import os
from pathlib import Path

from distcl import faults, storage
from distcl.config import JobConfig
from distcl.rundir import RunDir


def run_job(job: JobConfig, progress: bool = True, evaluate: bool = True, log=print) -> dict:
    """Train every task of ``job`` (resuming), then evaluate it and write the report."""
    from distcl.localray import init_ray
    from distcl.train.driver import Run

    init_ray()
    run = Run(job, progress=progress, log=log)
    out = run.run()
    if evaluate:
        from distcl.eval.evaluate import evaluate_run

        faults.pause_point(os.environ.get(faults.PAUSE_ENV), "eval", run.scenario.num_tasks - 1)
        out["eval"] = evaluate_run(run.dir, log=log)
    return out


def compare_jobs(jobs: list[JobConfig], out: Path, log=print, run: bool = True) -> list[dict]:
    """Run (or resume) every job, then write the side-by-side table and figure
    (:func:`distcl.eval.compare.write_comparison`). ``run=False`` only reads each finished
    run's ``metrics.json``."""
    from distcl.eval.compare import write_comparison

    fingerprints = {j.data_fingerprint() for j in jobs}
    if len(fingerprints) > 1:
        raise ValueError(
            "compare: the jobs do not share data/scenario/seed "
            f"({', '.join(j.name for j in jobs)}): their matrices are not comparable"
        )
    results = []
    for job in jobs:
        rd = RunDir(job.run_dir)
        if run:
            log(f"== {job.name} ({job.method.name})")
            metrics = run_job(job, progress=True, log=log)["eval"]
        elif not storage.is_file(rd.metrics_json):
            raise ValueError(f"{rd.metrics_json}: no metrics (run the job first, or drop --no-run)")
        else:
            metrics = storage.read_json(rd.metrics_json)
        results.append((job, metrics))
    return write_comparison(results, out, log=log)

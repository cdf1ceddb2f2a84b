"""Scoring a run dir for tuning: its job and scenario, the evaluation settings of the tuned
protocol, and rows 0..t of its matrices (``eval/rows/<i>.json``: computed once, then read).
Shared by the trials (``distcl.tune.trial``) and the shared first task (``distcl.tune.base``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from distcl import storage
from distcl.config import JobConfig
from distcl.rundir import RunDir


@functools.lru_cache(maxsize=8)
def _run_inputs(run_dir: str):
    """(job, scenario) of a run dir (read once per process)."""
    rd = RunDir(run_dir)
    return rd.load_job(), rd.load_scenario()


def tune_settings(job: JobConfig, protocol: str):
    """The evaluation settings of a tuning score: the job's, computing only the protocol
    the objective reads (``all``/``seen`` are the two item sets of ``closed``)."""
    from distcl.eval.engine import EvalSettings

    settings = EvalSettings.from_job(job)
    return dataclasses.replace(
        settings, protocols=("closed",) if protocol in ("all", "seen") else (protocol,)
    )


def score_rows(run_dir: str | Path, t: int, protocol: str = "seen") -> list[dict]:
    """Rows 0..t of the run's matrices (``eval/rows/<i>.json``: computed once, then read)."""
    from distcl.eval.evaluate import score_task

    job, scenario = _run_inputs(str(storage.location(run_dir).resolve()))
    settings = tune_settings(job, protocol)
    return [score_task(run_dir, job, scenario, i, settings=settings) for i in range(t + 1)]

"""One tuning trial: ONE Ray Train run over the trial job's whole task sequence.

The Tune function trainable (:func:`run_trial`) holds a fraction of a CPU (Tune's placement
group); it prepares the trial's run dir, adopts the search's shared base task when there is
one (``distcl.tune.base``), and calls ``Run.train`` once with

- ``score_fn`` (:func:`score_and_report`): after task t, rank 0 of the Train workers scores
  row t of the compatibility matrix from the Parquet embeddings on disk (``distcl.eval.
  evaluate.score_task``, cached in ``eval/rows/<t>.json``: earlier rows are never
  recomputed): ``tasks_done = t + 1``, ``objective``, ``ac``, ``am``, ``bc``, ``fc`` and the
  Pareto objectives ``obj_<metric>``; it sends them to the Tune trial (:class:`TuneLink`,
  the queue Ray's ``TuneReportCallback`` uses; the per-epoch reports stay in Train) and
  waits for Tune to ask for more, so ASHA grades the trial after every task and a stopped
  trial ends exactly between two tasks. Stopping ends the trial actor; its Train controller
  and workers die with it (they are owned by it), and Ray Train's placement-group cleaner
  removes their placement group (checked in tests/test_tune.py: no placement group is left
  after a search).

A restored or retried trial runs the same code: finished tasks on disk (``RunDir.done``)
are never retrained, a task cut mid-way resumes at its last epoch checkpoint, and the last
finished task is reported again first, so Tune and ASHA see where the trial stands.

Test: ``.venv/bin/python -m pytest tests/test_tune.py -q``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distcl import storage
from distcl.config import JobConfig, TuneConfig
from distcl.tune.scoring import _run_inputs, score_rows, tune_settings  # noqa: F401
from distcl.tune.space import objective, trial_job


# ------------------------------------------------------------------ scoring on the workers
def tune_metrics(rows: Sequence[dict], tc: TuneConfig, job: JobConfig) -> dict:
    """Task count, AC/AM/BC/FC of the objective's matrix, the objective and, for a Pareto
    search, ``obj_<m>`` (NaN of a one-model matrix read as AC 1, BC/FC 0: no pair yet)."""
    from distcl.eval import compat
    from distcl.eval import protocols as pr

    T = len(rows)
    name = pr.main_metric(tc.protocol, job.eval.metric, tuple(job.eval.topk))
    M = np.full((T, T), np.nan)
    for i, row in enumerate(rows):
        M[i, : i + 1] = row["protocols"][tc.protocol]["values"][name]
    iamcl2r = job.eval.preset == "iamcl2r" and tc.protocol == "identification"
    s = compat.summarize(M, job.eval.ties, am_ignores_zeros=iamcl2r)
    out = {"tasks_done": T, **{k: float(s[k]) for k in ("ac", "am", "bc", "fc")}}
    out["objective"] = objective(out["ac"], out["am"], tc.objective, tc.ac_floor)
    for m in tc.objectives:
        v = out[m]
        out[f"obj_{m}"] = v if not math.isnan(v) else {"ac": 1.0}.get(m, 0.0)
    return out


def score_tune(run_dir: str, t: int, *, tc: TuneConfig) -> dict:
    """``Run.train``'s ``score_fn`` in a trial: the tuning metrics after task t."""
    from distcl.tune.base import base_status

    job, _ = _run_inputs(str(storage.location(run_dir).resolve()))
    rows = score_rows(run_dir, t, tc.protocol)
    return {**tune_metrics(rows, tc, job),
            "base": base_status(run_dir)}  # fmt: skip


class TuneLink:
    """The trial's per-task reports, sent by rank 0 of the Train workers straight to the
    Tune trial (the queue Ray's ``TuneReportCallback`` uses), and a wait for Tune's answer.

    ``send`` puts the metrics, then an empty item that the trial reads only when Tune asks it
    for its next result, i.e. after the scheduler decided to continue. So the workers (the
    other ranks wait at the task's ``ray.train.report`` barrier) start the next task only
    once ASHA let the trial continue; a stopped trial ends exactly between two tasks, and no
    worker trains a task that will be thrown away. The per-epoch reports stay in Train.
    """

    def __init__(self, queue):
        self.queue = queue  # ray.util.queue.Queue(maxsize=1) of the trial's session

    @classmethod
    def from_session(cls) -> TuneLink:
        from distcl.raycompat import tune_result_queue

        return cls(tune_result_queue())

    def send(self, metrics: Mapping[str, Any], poll_s: float = 0.1) -> None:
        import time

        self.queue.put(dict(metrics))  # waits while an earlier item is unread
        self.queue.put({})  # falsy: read and dropped when Tune asks for the next result
        while not self.queue.empty():
            time.sleep(poll_s)


def score_and_report(run_dir: str, t: int, *, tc: TuneConfig, link: TuneLink | None) -> dict:
    """``Run.train``'s ``score_fn`` in a trial: score task t, report it to Tune, wait."""
    metrics = score_tune(run_dir, t, tc=tc)
    if link is not None:
        link.send(metrics)
    return metrics


# ------------------------------------------------------------------ the trainable
def run_trial(
    config: Mapping[str, Any],
    *,
    base: Mapping[str, Any],
    trials_root: str,
    job_name: str,
    tc: TuneConfig,
    shared_base: Mapping[int, str] | None = None,
    later_keys: Sequence[str] = (),
    board=None,
) -> None:
    """The Tune function trainable: ``config`` holds the sampled values (dotted keys). The
    confirm runs pass ``{"point": {key: value, "seed": s}, "variant": "best-<digest>"}``:
    their run dirs are named ``<job>-<variant>-seed<s>`` (found again on a rerun).
    ``board``: the search's ProgressBoard, which every trial posts to (one actor, not one
    per trial)."""
    from ray import tune

    from distcl.train.driver import Run
    from distcl.tune.base import adopt_base

    params = {k: v for k, v in config.items() if k not in ("point", "variant")}
    params.update(config.get("point") or {})
    if config.get("variant"):
        name = f"{job_name}-{config['variant']}-seed{params.get('seed', base['seed'])}"
    else:
        name = f"{job_name}-trial-{tune.get_context().get_trial_id()}"
    job = trial_job(base, params, name, trials_root)
    run = Run(job, progress=False, log=lambda m: print(f"[{job.name}] {m}", flush=True),
              board=board)  # fmt: skip
    with run.rd.lock():
        run.prepare()
        base_dir = (shared_base or {}).get(job.seed)
        if base_dir and not run.rd.done(0):
            status = adopt_base(base_dir, run, list(later_keys))
            print(f"[{job.name}] base task: {status}", flush=True)
        first = run.rd.finished_tasks()
        if first > 0:  # a restored trial, or the shared base: where it stands
            tune.report(score_tune(str(run.dir), first - 1, tc=tc))
        if first < run.scenario.num_tasks:
            link = TuneLink.from_session()
            run.train(score_fn=functools.partial(score_and_report, tc=tc, link=link))

"""One tuning trial: the full task sequence of a trial job, scored after every task.

The Tune trainable (:func:`run_trial`) is a thin shell in Tune's placement group (a
fraction of a CPU). The work runs in a :class:`TrialRunner` actor scheduled *outside* that
group: the task-sequence driver launches embedding tasks (1 CPU each) and a Train run with
its own placement group, and inside the trial's group the embedding tasks would wait
forever for a CPU the group does not hold.

After task t the runner scores the compatibility matrix of models 0..t (the rows of models
before t are kept, only row t is new) and the trainable reports
``{"task": t + 1, "objective", "ac", "am", "bc", "fc"}`` with a small checkpoint
(``tasks_done``). Reports fall *between* Train runs, so when ASHA stops a trial no Train run
is alive: its worker placement group was already released (Ray Train's own cleaner needs
the State API, which is not there when the dashboard is off or several Ray instances share
a machine). A restored trial continues after its last reported task; finished tasks on disk
are never retrained (``is_model_done``).

Test: ``.venv/bin/python -m pytest tests/test_tune.py -q``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distcl.config import JobConfig, TuneConfig
from distcl.tune.space import objective, trial_job


def _pair_metric(q_emb: np.ndarray, g_emb: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """metric(queries embedded by one model, gallery by another), the same items both sides."""
    from distcl.eval.metrics import retrieval_summary

    if metric == "map":
        ks = (1,)
    elif metric.split("@")[0] in ("cmc", "recall") and metric.split("@")[-1].isdigit():
        ks = (int(metric.split("@")[1]),)
    else:
        raise ValueError(f"eval.metric: {metric!r} is not one of 'map', 'cmc@K', 'recall@K'")
    out = retrieval_summary(q_emb, labels, g_emb, labels, exclude_self=True, topk=ks,
                            recall_ks=ks)  # fmt: skip
    return float(out[metric])


def grow_matrix(
    M: np.ndarray,
    embs: Sequence[np.ndarray],
    labels: np.ndarray,
    masks: Sequence[np.ndarray] | None,
    metric: str,
) -> np.ndarray:
    """The (T, T) compatibility matrix of ``embs`` (T models) given the rows already in
    ``M`` ((R, R), R <= T): only rows R..T-1 are computed. Same values as
    ``distcl.eval.compat.compatibility_matrix(embs, labels, metric, True, masks)``.

    M[i][j], j <= i: queries embedded by model i, gallery by model j, on the items of
    ``masks[j]`` (the classes model j had seen) or on all items when ``masks`` is None.
    """
    T, R = len(embs), M.shape[0]
    if R > T or M.shape != (R, R):
        raise ValueError(f"M must be (R, R) with R <= {T}, got {M.shape}")
    out = np.full((T, T), np.nan)
    out[:R, :R] = M
    for i in range(R, T):
        for j in range(i + 1):
            mask = slice(None) if masks is None else masks[j]
            out[i, j] = _pair_metric(embs[i][mask], embs[j][mask], labels[mask], metric)
    return out


def score_run(
    run_dir: str | Path, tc: TuneConfig, tasks: int, M: np.ndarray | None = None
) -> tuple[dict[str, float], np.ndarray]:
    """Score the first ``tasks`` models of a run dir for tuning: (metrics, matrix).

    ``M``: the matrix of an earlier call (its rows are reused). Metrics: ``task``, the
    compatibility scores ``ac`` (NaN for one model), ``am``, ``bc``, ``fc`` and the
    ``objective`` of ``tc``.
    """
    import yaml

    from distcl.config import parse_job
    from distcl.data.scenario import Scenario
    from distcl.eval import compat
    from distcl.eval.evaluate import _load_eval_embeddings

    run_dir = Path(run_dir)
    job = parse_job(yaml.safe_load((run_dir / "job.yaml").read_text()), str(run_dir / "job.yaml"))
    scenario = Scenario.from_json(json.loads((run_dir / "scenario.json").read_text()))
    _ids, labels, embs = _load_eval_embeddings(run_dir, tasks, job.eval.items_per_class, job.seed)
    masks = None
    if tc.protocol == "seen":
        masks = [np.isin(labels, scenario.tasks[t].seen_classes) for t in range(tasks)]
    M = grow_matrix(np.zeros((0, 0)) if M is None else M, embs, labels, masks, job.eval.metric)
    s = compat.summarize(M)
    metrics = {"task": tasks, **{k: float(s[k]) for k in ("ac", "am", "bc", "fc")}}
    metrics["objective"] = objective(metrics["ac"], metrics["am"], tc.objective, tc.ac_floor)
    return metrics, M


class TrialRunner:
    """The task sequence of one trial job (a Ray actor outside the trial's placement group)."""

    def __init__(self, job: JobConfig, tc: TuneConfig):
        from distcl.train.driver import Run

        self.tc = tc
        self.run = Run(job, progress=False, log=lambda m: print(f"[{job.name}] {m}", flush=True))
        self.scenario = self.run.prepare()
        self.M: np.ndarray | None = None

    def num_tasks(self) -> int:
        return self.scenario.num_tasks

    def task(self, t: int) -> dict[str, float]:
        """Train task t (unless its model is on disk), embed, score models 0..t."""
        from distcl.train.modeling import is_model_done

        if not is_model_done(self.run.dir, t):
            self.run.train_task(t)
        self.run.end_task(t)
        metrics, self.M = score_run(self.run.dir, self.tc, t + 1, self.M)
        return metrics


def run_trial(
    config: Mapping[str, Any],
    *,
    base: Mapping[str, Any],
    trials_root: str,
    job_name: str,
    tc: TuneConfig,
) -> None:
    """The Tune function trainable: ``config`` holds the sampled values (dotted keys)."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    job = trial_job(base, config, f"{job_name}-trial-{trial_id}", trials_root)
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a restored trial: continue after its last report
        with ckpt.as_directory() as d:
            start = int(json.loads((Path(d) / "progress.json").read_text())["tasks_done"])
    runner = (
        ray.remote(TrialRunner)
        .options(
            num_cpus=0,
            scheduling_strategy="DEFAULT",  # out of the trial's placement group
        )
        .remote(job, tc)
    )
    try:
        for t in range(start, ray.get(runner.num_tasks.remote())):
            metrics = ray.get(runner.task.remote(t))
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "progress.json").write_text(json.dumps({"tasks_done": t + 1}))
                # Blocks until Tune asks for more; a stopped trial exits here, between tasks.
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    finally:
        ray.kill(runner)

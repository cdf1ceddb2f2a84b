"""Experiment tracking: a run, a search and a comparison where teams already look (MLflow,
TensorBoard), beside the run directory's own files (docs/tracking.md).

    output: {tracking: mlflow, tracking_uri: http://127.0.0.1:5000, experiment: distcl}

The driver owns the tracked run (:class:`RunTracker`): it creates it before training (an
unreachable tracker fails here, naming the URI), logs the resolved job as parameters and the
tags, keeps the run's id in the run directory (``tracking.json``: a resumed run continues it,
never a duplicate), and after the evaluation logs each task's matrix row and the summaries so
far, then the report, ``metrics.json``, the heatmaps and the backfilling curves as artifacts.
Rank 0 of the Train workers logs each epoch's loss terms, accuracy and images/s and each
task's end-of-task times into the same run (:class:`WorkerTracker`: Ray's ``setup_mlflow``
joined to the driver's run by its id; rank 0 only). Tune searches log a parent run with a
child per trial (Ray's ``MLflowLoggerCallback``, ``distcl.tune.search``); ``distcl compare``
logs one run.

A tracker that fails mid-run (a server gone) is reported once and then left alone: the run
goes on and its files are complete. Requests fail fast (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``_TIMEOUT``: MLflow's defaults retry for ~4 minutes per call).

``tensorboard``: event files under ``<run>/tensorboard/`` (tensorboardX): the epochs from
rank 0 (``train``), the matrix rows and summaries from the driver (``eval``).
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distcl import storage

#: what a tracker's HTTP client does per request unless the environment says otherwise
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip


def metric_key(name: str) -> str:
    """A metric name as both trackers keep it ("@" is not allowed in TensorBoard tags)."""
    return name.replace("@", "_at_")


def _fast_fail() -> None:
    for k, v in FAST_FAIL_ENV.items():
        os.environ.setdefault(k, v)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists and tuples as their JSON text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else v
    return out


def git_commit() -> str | None:
    """The checkout's commit, when distcl runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(job) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("distcl")
    except PackageNotFoundError:
        __version__ = "unknown"
    tags = {"distcl.method": job.method.name, "distcl.dataset": job.data.source,
            "distcl.scenario": f"{job.scenario.setup}, {job.scenario.tasks} tasks",
            "distcl.version": __version__, "distcl.job": job.name}  # fmt: skip
    if commit := git_commit():
        tags["distcl.git_commit"] = commit
    return tags


class _Guard:
    """Calls into a tracker: the first failure is reported (``log``) and turns it off."""

    def __init__(self, where: str, log=print):
        self.where, self.log, self.dead = where, log, False

    def __call__(self, fn, *args, **kw):
        if self.dead:
            return None
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001  (any client error: the run must go on)
            self.dead = True
            msg = (f"tracking: {self.where} failed ({type(e).__name__}: {str(e)[:200]}); the "
                   "run goes on untracked, its files are complete")  # fmt: skip
            self.log(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return None


def mlflow_uri(job) -> str:
    uri = job.output.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(
            "output.tracking_uri: mlflow needs a tracking URI (a server "
            "http://host:5000, or file:/path); MLFLOW_TRACKING_URI is unset"
        )
    return uri


def mlflow_client(uri: str):
    """An MLflow client of ``uri`` that fails fast; ValueError naming the URI when it does
    not answer (checked with one request)."""
    _fast_fail()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"output.tracking_uri: the MLflow tracker at {uri} does not answer "
                         f"({type(e).__name__}: {str(e)[:160]})") from None  # fmt: skip
    return client


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def _log_files(guard, client, run_id: str, paths: Iterable) -> None:
    """Each of ``paths`` that is a file, as an artifact of run ``run_id`` (through ``guard``)."""
    for p in paths:
        if storage.is_file(p):
            guard(client.log_artifact, run_id, str(p))


class RunTracker:
    """The driver's side of a tracked run (see the module docstring)."""

    def __init__(self, job, run_dir, log=print):
        self.job, self.kind, self.log = job, job.output.tracking, log
        self.root = storage.location(run_dir)
        self.state_path = storage.join(self.root, "tracking.json")
        self.guard = _Guard(f"{self.kind} tracking", log)
        self.client = self.run_id = self.uri = self.writer = self.experiment = None

    @classmethod
    def for_job(cls, job, run_dir, log=print) -> RunTracker | None:
        return None if job.output.tracking == "none" else cls(job, run_dir, log)

    def start(self) -> None:
        """Create (or, for a resumed run, reopen) the tracked run; errors name the URI."""
        if self.kind == "tensorboard":
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(self.root) / "tensorboard" / "eval"))
            return
        self.uri = mlflow_uri(self.job)
        self.client = mlflow_client(self.uri)
        state = storage.read_json(self.state_path) if storage.is_file(self.state_path) else {}
        if state.get("run_id") and state.get("tracking_uri") == self.uri:
            self.run_id, self.experiment = state["run_id"], state["experiment_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.log(f"tracking: continuing MLflow run {self.run_id} at {self.uri}")
            return
        from mlflow.entities import Param, RunTag

        from distcl.config import to_dict

        exp = self.experiment = experiment_id(self.client, self.job.output.experiment)
        run = self.client.create_run(exp, run_name=self.job.name, tags=run_tags(self.job))
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(self.job)).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("distcl.run_dir", str(self.root))])
        from distcl.rundir import atomic_write_json

        state = {"kind": "mlflow", "tracking_uri": self.uri, "run_id": self.run_id,
                 "experiment_id": exp}  # fmt: skip
        atomic_write_json(self.state_path, state)
        self.log(f"tracking: MLflow run {self.run_id} at {self.uri} "
                 f"(experiment {self.job.output.experiment!r})")  # fmt: skip

    def worker_info(self) -> dict | None:
        """What rank 0 of the Train workers needs to log into this run."""
        if self.kind == "tensorboard":
            return {"kind": "tensorboard", "dir": str(Path(self.root) / "tensorboard" / "train")}
        return {"kind": "mlflow", "tracking_uri": self.uri, "run_id": self.run_id,
                "experiment_id": self.experiment,
                "run_name": self.job.name}  # fmt: skip

    def log_eval(self, result: dict) -> None:
        """Each task's matrix row and the summaries of the matrix so far (step = task)."""
        import numpy as np

        from distcl.eval import compat

        metrics: list[tuple[str, float, int]] = []
        for proto, block in result["protocols"].items():
            M = np.asarray(block["matrices"][block["metric"]], dtype=float)
            name = f"{proto}.{block['metric']}"
            for i in range(len(M)):
                metrics.append((f"{name}.diagonal", M[i, i], i))
                metrics.append((f"{name}.row_mean", float(np.nanmean(M[i, : i + 1])), i))
                for j in range(i + 1):
                    metrics.append((f"{name}.M_{i + 1}_{j + 1}", M[i, j], i))
                s = compat.summarize(M[: i + 1, : i + 1], result.get("ties", "strict"))
                for key in ("ac", "am", "bc", "fc"):
                    if s[key] is not None and np.isfinite(s[key]):
                        metrics.append((f"{name}.{key}", float(s[key]), i))
        for t, stale in enumerate(result.get("stale_gallery") or []):
            if stale and "cmc@1" in stale:
                metrics.append(("stale_gallery.cmc@1", stale["cmc@1"], t))
        metrics = [(k, float(v), s) for k, v, s in metrics if v is not None and np.isfinite(v)]
        if self.kind == "tensorboard":
            for k, v, s in metrics:
                self.guard(self.writer.add_scalar, metric_key(k), v, s)
            self.guard(self.writer.flush)
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_key(k), v, now, s) for k, v, s in metrics]
        for i in range(0, len(batch), 1000):
            self.guard(self.client.log_batch, self.run_id, metrics=batch[i : i + 1000])

    def log_artifacts(self, paths: Iterable) -> None:
        if self.kind == "mlflow":
            _log_files(self.guard, self.client, self.run_id, paths)

    def finish(self, status: str = "FINISHED") -> None:
        if self.kind == "tensorboard":
            self.guard(self.writer.close)
        elif self.run_id:
            self.guard(self.client.set_terminated, self.run_id, status)


def run_artifacts(run_dir) -> list:
    """What a finished run logs as artifacts: the report, metrics, figures, curves."""
    root = Path(storage.location(run_dir))
    names = ["report.md", "metrics.json", "backfill.png", "backfill/curves.json",
             "backfill/curves.parquet"]  # fmt: skip
    return [root / n for n in names] + sorted(root.glob("*.png"))


class WorkerTracker:
    """Rank 0's logging into the driver's run (``info``: :meth:`RunTracker.worker_info`);
    a no-op on the other ranks and without tracking."""

    def __init__(self, info: dict | None, rank: int, log=print):
        self.kind = None if info is None or rank != 0 else info["kind"]
        self.guard = _Guard(f"{self.kind} tracking (Train worker)", log)
        self.mlflow = self.writer = None
        if self.kind == "mlflow":
            _fast_fail()
            from ray.air.integrations.mlflow import setup_mlflow

            os.environ["MLFLOW_RUN_ID"] = info["run_id"]  # join the driver's run, not a new one
            self.mlflow = self.guard(setup_mlflow, tracking_uri=info["tracking_uri"],
                                     experiment_id=info["experiment_id"],
                                     run_name=info["run_name"], rank_zero_only=True)  # fmt: skip
            if self.mlflow is None:
                self.kind = None
        elif self.kind == "tensorboard":
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(info["dir"])

    def log(self, metrics: dict, step: int, prefix: str) -> None:
        vals = {metric_key(f"{prefix}{k.replace('/', '.')}"): float(v) for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        if self.kind == "mlflow":  # queued: rank 0 never waits on the tracker mid-epoch
            self.guard(self.mlflow.log_metrics, vals, step=step, synchronous=False)
        elif self.kind == "tensorboard":
            for k, v in vals.items():
                self.guard(self.writer.add_scalar, k, v, step)
            self.guard(self.writer.flush)

    def close(self) -> None:
        if self.kind == "mlflow":
            self.guard(self.mlflow.flush_async_logging)  # the queued metrics, before the end
            os.environ.pop("MLFLOW_RUN_ID", None)
        elif self.kind == "tensorboard":
            self.guard(self.writer.close)


class SideRun:
    """A tracked run of a search or a comparison (MLflow only: TensorBoard has no runs to
    group): created, or continued from ``state`` (a file holding its id), at start."""

    def __init__(self, job, name: str, state, log=print, tags: dict | None = None):
        self.uri = mlflow_uri(job)
        self.client = mlflow_client(self.uri)
        self.guard = _Guard(f"MLflow tracking of {name}", log)
        saved = storage.read_json(state) if state and storage.is_file(state) else {}
        self.experiment = experiment_id(self.client, job.output.experiment)
        if saved.get("run_id") and saved.get("tracking_uri") == self.uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=name,
                                         tags={**run_tags(job), **(tags or {})})  # fmt: skip
            self.run_id = run.info.run_id
            if state:
                from distcl.rundir import atomic_write_json

                atomic_write_json(state, {"kind": "mlflow", "tracking_uri": self.uri,
                                          "run_id": self.run_id})  # fmt: skip
        log(f"tracking: MLflow run {self.run_id} ({name}) at {self.uri}")

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.guard(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(v)]  # fmt: skip
        for i in range(0, len(items), 1000):
            self.guard(self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def log_artifacts(self, paths) -> None:
        _log_files(self.guard, self.client, self.run_id, paths)

    def finish(self, status: str = "FINISHED") -> None:
        self.guard(self.client.set_terminated, self.run_id, status)

    def tag_trials(self, rows: list[dict]) -> None:
        """Each trial's child run gets its outcome (``distcl.status``: finished, stopped
        early by ASHA, error) from the search's table."""
        status = {str(r["trial"]).split(" ")[0]: r["status"] for r in rows}
        children = self.guard(self.client.search_runs, [self.experiment],
                              f"tags.mlflow.parentRunId = '{self.run_id}'") or []  # fmt: skip
        for child in children:
            name = child.data.tags.get("trial_name", "")  # Ray's "<trainable>_<trial id>"
            for trial, st in status.items():
                if name.endswith(f"_{trial}") or name == f"trial-{trial}":
                    self.guard(self.client.set_tag, child.info.run_id, "distcl.status", st)

    def trial_callback(self, job):
        """Ray Tune's ``MLflowLoggerCallback``: a child run of this one per trial."""
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return MLflowLoggerCallback(
            tracking_uri=self.uri, experiment_name=job.output.experiment,
            tags={"mlflow.parentRunId": self.run_id, **run_tags(job)},
        )  # fmt: skip

"""The task-sequence driver: it coordinates; the Train workers do the work.

    distcl run jobs/quickstart.yaml            # embedded local Ray (binds 127.0.0.1)
    RAY_ADDRESS=auto distcl run JOB            # an existing cluster (or `distcl submit`)

``Run.run`` holds the run directory's lock, builds (or reuses) the shards, starts the memory
service when the method replays, and runs ONE ``TorchTrainer`` over every remaining task
(``distcl.train.loop``): Ray Train starts once per run. Training, the end-of-task embedding
passes, class statistics and exemplar candidates all run on the workers; the driver holds
only the config, the scenario and per-task summaries. A finished task is never trained again;
a crashed run resumes at its last (task, epoch) checkpoint. Then ``distcl.eval`` scores the
run and writes the report.

``output.root`` may be an object-store URI (``s3://bucket/runs``): the run directory, the shards
and Ray Train's checkpoints (``storage_filesystem``: the same pyarrow filesystem) all live
there, so nodes that share no file system run one job; every process needs the bucket's
credentials (the AWS variables, ``distcl.storage``). The run-dir lock is then local to the
driver's machine plus a lock object naming the holder (``RunDir.lock`` says what that does
and does not guarantee).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import ray
import yaml

from distcl import faults, storage
from distcl.catalog import SPECS, needs_of
from distcl.config import ConfigError, JobConfig, dump_job, parse_job, to_dict
from distcl.data.scenario import Scenario
from distcl.data.shards import build_shards, load_manifest
from distcl.localray import (  # noqa: F401  (init_ray: re-exported)
    NAMESPACE,
    init_ray,
    scoped_env,
)
from distcl.memory.service import create_memory_service
from distcl.placement import worker_nodes
from distcl.rundir import RunDir, atomic_write, atomic_write_json, read_meta
from distcl.train.plan import RunPlan, Shard, TaskPlan
from distcl.train.progress import RunProgress, progress_board, show_progress

#: Ray Train settings of distcl's runs, unless this process's environment sets them (Train
#: reads them when ``fit`` creates the controller, which passes them on to the workers):
#: - the controller polls the workers every 0.5 s, not every 2 s: a worker's
#:   ``ray.train.report`` waits in a one-slot queue until a poll takes the previous report,
#:   and a run ends a poll after the one that took its last report (so the loop reports only
#:   what is read: :meth:`distcl.train.loop.Worker._report_epoch`);
#: - no preemption watcher on a one-node Ray (an actor per run that watches for nodes being
#:   drained; on one node the driver goes with the node, so nothing is left to act on it).
#: Both together: a tiny 2-task, 2-worker run 18-20 s -> 10.6-12 s on 2 cores; the
#: quickstart's once-per-run cost 12.7 -> 10.1 s (``distcl bench sequence``).
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
ONE_NODE_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def train_env() -> dict[str, str]:
    """The Ray Train variables distcl sets for a Train run (``TRAIN_ENV``), less those this
    process's environment sets itself."""
    env = dict(TRAIN_ENV)
    if not worker_nodes(ray.nodes(), gpu=False):  # one node: the head is all there is
        env.update(ONE_NODE_TRAIN_ENV)
    return {k: v for k, v in env.items() if k not in os.environ}


#: The fields that decide what a run trains (eval/output/tune may change between re-runs).
TRAINING_FIELDS = ("name", "seed", "data", "scenario", "model", "method", "memory", "train")


def training_digest(job: JobConfig) -> str:
    """Hash of the fields that decide what is trained: names the Ray Train run, so a
    checkpoint of another training config is never resumed."""
    keep = {k: v for k, v in to_dict(job).items() if k in TRAINING_FIELDS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


class Run:
    """One job's run directory and its sequence of tasks."""

    def __init__(self, job: JobConfig, progress: bool = True, log=print, board=None,
                 tracker=None):  # fmt: skip
        """``board``: the ProgressBoard to post to (a tuning search shares its own with its
        trials); default: this process's (:func:`~distcl.train.progress.progress_board`)."""
        self.job = job
        self.board = board
        self.rd = RunDir(job.run_dir)
        self.dir = self.rd.root
        self.progress = progress
        self.log = log
        self.needs = needs_of(job)  # the method's, its replay share resolved
        self.uses_memory = self.needs.memory
        #: A finished model folder of another run to be compatible with from task 0 on.
        self.external_old_model = SPECS[job.method.name].external_old_model(job.method.params)
        self.digest = training_digest(job)
        self.tracker = tracker  # a distcl.tracking.RunTracker, started with the run

    # -- set-up --------------------------------------------------------------------
    def prepare(self) -> Scenario:
        storage.makedirs(self.dir)
        if removed := self.rd.clean_temp():
            self.log(f"removed {len(removed)} temp file(s) left by an interrupted write")
        self._check_same_job()
        t0 = time.perf_counter()
        shards_dir, scenario, rebuilt = build_shards(self.job, log=self.log)
        if rebuilt:
            self.log(f"built shards in {time.perf_counter() - t0:.1f}s -> {shards_dir}")
        self.manifest = load_manifest(shards_dir)
        self.shards_dir = shards_dir.resolve()
        self.num_classes = int(self.manifest["num_classes"])
        self.in_channels = int(self.manifest["image_shape"][0])
        self.scenario = scenario
        self._check_external_old_model()
        atomic_write_json(self.rd.scenario_json, scenario.to_json())
        return scenario

    def _check_same_job(self) -> None:
        """A run dir belongs to one job: refuse to resume it with another training config,
        and drop Train checkpoints of another config (they would resume the wrong run)."""
        path = self.rd.job_yaml
        if storage.is_file(path):
            theirs = parse_job(yaml.safe_load(storage.read_text(path)) or {}, str(path))
            diff = [k for k in TRAINING_FIELDS if to_dict(self.job)[k] != to_dict(theirs)[k]]
            if diff and storage.exists(self.dir / "models"):
                raise ConfigError(
                    f"{self.dir}: run dir holds models of a different job (fields differ: "
                    f"{', '.join(diff)}); use another output.root or name, or delete it"
                )
        for old in storage.listdir(self.rd.ray_storage):  # [] when there is none
            if old.is_dir and old.name != self.train_run_name:
                where = self.rd.ray_storage / old.name
                self.log(f"discarding {where}: a checkpoint of another training config")
                storage.delete_dir(where)
        atomic_write(path, dump_job(self.job))

    def _check_external_old_model(self) -> None:
        """An external old model (BCT's ``old_model_dir``) may hold another backbone, never
        another embedding dimension: fail here, before any worker starts."""
        external = self.external_old_model
        if external:
            dim = read_meta(external)["signature"]["embedding_dim"]
            if dim != self.job.model.embedding_dim:
                raise ConfigError(
                    f"method.params.old_model_dir: {external} embeds in {dim} dimensions but "
                    f"model.embedding_dim={self.job.model.embedding_dim}; compatible training "
                    "needs equal embedding dimensions"
                )

    @property
    def train_run_name(self) -> str:
        return f"seq-{self.digest}"

    @property
    def run_id(self) -> str:
        return f"{self.job.name}-{hashlib.sha1(str(self.dir).encode()).hexdigest()[:8]}"

    def memory_service(self):
        """The run's memory service (the handles are kept: an unreferenced named actor dies)."""
        if getattr(self, "_memory", None) is None:
            m = self.job.memory
            self._memory = create_memory_service(
                self.run_id, str(self.rd.memory), m.per_class, m.total, self.job.seed,
                shards=m.shards, namespace=NAMESPACE,
            )  # fmt: skip
        return self._memory

    def old_model_dir(self, t: int) -> str | None:
        """The frozen old model of task t: model t-1, or for t=0 an external model to be
        compatible with (BCT's ``old_model_dir``)."""
        if t > 0:
            return str(self.rd.model(t - 1))
        return str(self.external_old_model) if self.external_old_model else None

    # -- the plan the workers follow ------------------------------------------------------
    def _shards(self, split: str, tasks) -> tuple[Shard, ...]:
        return tuple(
            (str(self.shards_dir / s["name"]), int(s["count"]))
            for s in self.manifest["shards"]
            if s["split"] == split and s["task"] in tasks and s["count"] > 0
        )

    def plan(self, upto: int, **services) -> RunPlan:
        """The :class:`~distcl.train.plan.RunPlan` of training tasks ``.. upto - 1``;
        ``services``: the run's handles (memory, progress, score_fn, fault, pause)."""
        T = self.scenario.num_tasks
        tasks = []
        for t, task in enumerate(self.scenario.tasks):
            old = self.scenario.tasks[t - 1].seen_classes if t > 0 else ()
            tasks.append(TaskPlan(
                index=t, new_classes=tuple(c for c in task.seen_classes if c not in old),
                seen_classes=tuple(task.seen_classes), old_classes=tuple(old),
                train_shards=self._shards("train", set(range(t + 1)) if self.needs.all_data
                                          else {t}),
                memory_shards=self._shards("train", {t}), old_model_dir=self.old_model_dir(t),
            ))  # fmt: skip
        return RunPlan(
            job=self.job,
            run_dir=str(self.dir),
            num_tasks=T,
            upto=upto,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            scenario_digest=self.scenario.digest(),
            train_digest=self.digest,
            needs=self.needs,
            tasks=tuple(tasks),
            eval_shards=self._shards("gallery", set(range(T)) | {-1}),
            **services,
        )  # fmt: skip  (-1: the held-out classes' items)

    # -- training ------------------------------------------------------------------------
    def train(self, upto: int | None = None, score_fn=None) -> dict:
        """Train (and finish) every task before ``upto`` not finished yet: one Train run.

        ``score_fn(run_dir, t) -> dict`` (picklable) runs on rank 0 after task t and its
        result joins the task's report (a tuning trial's)."""
        from ray.train import (
            CheckpointConfig,
            FailureConfig,
            LoggingConfig,
            RunConfig,
            ScalingConfig,
        )

        from distcl.train.trainer import Trainer, run_sequence

        job, T = self.job, self.scenario.num_tasks
        upto = T if upto is None else upto
        first = self.rd.finished_tasks()
        for t in range(min(first, upto)):
            self.log(f"task {t + 1}/{T}: done, skipped")
        if first >= upto:
            return {}
        use_gpu = {"yes": True, "no": False}.get(job.train.use_gpu)
        gpw = job.train.gpus_per_worker
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= job.train.workers * gpw
        page = RunProgress(self.board or progress_board(), self.run_id)
        plan = self.plan(
            upto, memory=self.memory_service() if self.uses_memory else None, progress=page,
            score_fn=score_fn, fault=os.environ.get(faults.FAULT_ENV),
            tracking=self.tracker.worker_info() if self.tracker else None,
            pause=os.environ.get(faults.PAUSE_ENV),
        )  # fmt: skip
        trainer = Trainer(
            run_sequence,
            # The controller unpickles train_loop_config but never reads the plan (the job,
            # every task's shard lists, handles): it gets a reference.
            train_loop_config={"plan": ray.put(plan)},
            scaling_config=ScalingConfig(
                num_workers=job.train.workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": job.train.cpus_per_worker,
                                      **({"GPU": gpw} if use_gpu else {})},
            ),
            run_config=RunConfig(
                name=self.train_run_name,
                **self.rd.ray_storage_args(),  # a path, or the bucket's pyarrow filesystem
                failure_config=FailureConfig(max_failures=job.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING"),  # progress bar, not logs
            ),
        )  # fmt: skip
        epochs = {t: job.train.epochs_for(t) for t in range(first, upto)}
        t0, fit_at = time.perf_counter(), time.time()
        title = f"{job.name} ({job.method.name})"
        with (
            show_progress(page, title, epochs, self.progress, self._log_task) as told,
            scoped_env(train_env()),
        ):
            result = trainer.fit()
        if result.error:
            raise result.error
        wall, back = time.perf_counter() - t0, time.time()
        ret = result.return_value or {}
        timings = ret.get("timings", {})
        for t in range(first, upto):
            if t not in told:  # finished after the last poll
                self._log_task(t, timings.get(t, {}))
        out = {"wall_s": wall, "tasks": timings}
        if "entered_at" in ret:  # wall clocks of this machine and rank 0's (one node: exact)
            out["run_overhead"] = {
                "startup_s": ret["entered_at"] - fit_at,  # controller, workers, process group
                "setup_s": ret["tasks_started_at"] - ret["entered_at"],  # model, warm-up
                "shutdown_s": back - ret["tasks_ended_at"],  # workers end, result returns
            }
        return out

    def _log_task(self, t: int, timing: dict) -> None:
        history = storage.read_json(self.rd.model(t) / "history.json")
        last = history[-1] if history else {}
        terms = " ".join(f"{k[5:]}={v:.3f}" for k, v in last.items() if k.startswith("loss/"))
        rows = last.get("rows_per_s", 0)
        replay = f" ({rows:.0f} rows/s with replay)" if last.get("replay_rows") else ""
        self.log(
            f"task {t + 1}/{self.scenario.num_tasks}: train_acc={last.get('train_acc', 0):.3f} "
            f"{last.get('new_images_per_s', 0):.0f} new img/s{replay} {terms} | train "
            f"{timing.get('train_s', 0):.1f}s, end-of-task {timing.get('end_task_s', 0):.1f}s"
        )

    def run(self) -> dict:
        """Prepare and train every task (under the run directory's lock)."""
        with self.rd.lock():
            self.prepare()
            if self.tracker is not None:  # before training: an unreachable tracker fails here
                self.tracker.start()
            out = self.train()
        return {"run_dir": str(self.dir), **out}

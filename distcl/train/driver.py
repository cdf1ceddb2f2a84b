"""The task-sequence driver: one Ray Train run per task, then the task's end-of-task work.

    distcl run jobs/quickstart.yaml            # embedded local Ray (binds 127.0.0.1)
    RAY_ADDRESS=auto distcl run JOB            # an existing cluster (or `distcl submit`)

For task t = 0..T-1 (skipping finished ones on resume):
  1. train: a ``TorchTrainer`` with ``train.workers`` DDP workers (gloo on CPU, nccl on GPU);
     the previous model is loaded as the start point and, frozen, as the old model;
  2. ``models/<t>/`` is written atomically from the last checkpoint;
  3. end-of-task (idempotent, marked by ``models/<t>/post.json``): one embedding pass of the
     evaluation set by model t (its rows arriving at t also form the stored gallery: never
     re-embedded later), and, for replay methods, one pass over task t's training items
     for exemplar selection and the running class means.
Finally the evaluation and report (``distcl.eval.evaluate``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch

from distcl.config import ConfigError, JobConfig, dump_job, parse_job, to_dict
from distcl.data.scenario import Scenario
from distcl.data.shards import (
    atomic_write_bytes,
    build_shards,
    exact_split,
    load_manifest,
    shard_paths,
)
from distcl.methods import METHODS, TaskContext, method_params
from distcl.train.modeling import (
    build_model,
    is_model_done,
    load_frozen_model,
    model_meta,
    save_model_dir,
)

NAMESPACE = "distcl"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS), else start an embedded local Ray on
    127.0.0.1 with the dashboard off."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, logging_level="WARNING")
    else:
        # The dashboard serves the State API that Train/Tune use to clean up placement
        # groups of stopped runs (stack-notes); it binds to 127.0.0.1 too.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            namespace=NAMESPACE,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
            runtime_env=env,
        )


# ------------------------------------------------------------------------ embedding
@ray.remote(num_cpus=1)
def _embed_shards(
    job: JobConfig, model_dir: str, paths: list[str], num_classes: int, in_channels: int
) -> dict:
    """Embed every sample of ``paths`` with the model in ``model_dir``."""
    from distcl.data.shards import iter_shard

    torch.set_num_threads(1)
    model = load_frozen_model(model_dir, job)
    keys, labels, tasks, embs = [], [], [], []
    for p in paths:
        batch = []
        for key, img, lab, meta in iter_shard(Path(p)):
            keys.append(key)
            labels.append(lab)
            tasks.append(meta["task"])
            batch.append(img)
            if len(batch) == 256:
                embs.append(_embed(model, batch))
                batch = []
        if batch:
            embs.append(_embed(model, batch))
    d = model.embedding_dim if hasattr(model, "embedding_dim") else job.model.embedding_dim
    return {
        "keys": np.asarray(keys, dtype=object),
        "labels": np.asarray(labels, np.int64),
        "tasks": np.asarray(tasks, np.int32),
        "emb": np.concatenate(embs) if embs else np.zeros((0, d), np.float32),
    }


def _embed(model, images: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.stack(images)).float().div_(255.0)
        return model.embed(x).numpy().astype(np.float32)  # (B, D), L2-normalised


def embed_paths(
    job: JobConfig, model_dir: Path, paths: list[Path], num_classes: int, in_channels: int
) -> dict:
    """Embed shards in parallel Ray tasks (each shard to exactly one task), in path order."""
    if not paths:
        return {
            "keys": np.zeros(0, object),
            "labels": np.zeros(0, np.int64),
            "tasks": np.zeros(0, np.int32),
            "emb": np.zeros((0, job.model.embedding_dim), np.float32),
        }
    n = max(1, min(len(paths), int(ray.available_resources().get("CPU", 1)) or 1))
    groups = [[str(p) for p in exact_split(paths, rank, n)] for rank in range(n)]
    parts = ray.get(
        [_embed_shards.remote(job, str(model_dir), g, num_classes, in_channels) for g in groups]
    )
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("keys", "labels", "tasks", "emb")}
    order = np.argsort(out["keys"].astype(str), kind="stable")  # deterministic row order
    return {k: v[order] for k, v in out.items()}


@ray.remote(num_cpus=1)
def _collect_images(paths: list[str], keys: list[str]) -> dict:
    from distcl.data.shards import iter_shard

    wanted = set(keys)
    found = {}
    for p in paths:
        for key, img, _lab, _meta in iter_shard(Path(p)):
            if key in wanted:
                found[key] = img
    return found


# ------------------------------------------------------------------------ the run
class Run:
    """One job's run directory and its sequence of tasks."""

    def __init__(self, job: JobConfig, progress: bool = True, log=print):
        self.job = job
        self.dir = job.run_dir.resolve()  # absolute: Ray workers run in another cwd
        self.progress = progress
        self.log = log
        self.params = method_params(job.method.name, dict(job.method.params))
        self.needs = METHODS[job.method.name].needs_for(self.params)
        self.uses_memory = self.needs.replay_fraction > 0 or self.needs.class_means

    # -- set-up --------------------------------------------------------------------
    def prepare(self) -> Scenario:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_same_job()
        t0 = time.perf_counter()
        shards_dir, scenario, rebuilt = build_shards(self.job)
        if rebuilt:
            self.log(f"built shards in {time.perf_counter() - t0:.1f}s -> {shards_dir}")
        self.shards_dir = shards_dir.resolve()
        manifest = load_manifest(shards_dir)
        self.num_classes = int(manifest["num_classes"])
        self.in_channels = int(manifest["image_shape"][0])
        self.counts = {s["name"]: s["count"] for s in manifest["shards"]}
        self.scenario = scenario
        self.digest = scenario.digest()
        self._check_external_old_model()
        atomic_write_bytes(self.dir / "scenario.json", json.dumps(scenario.to_json()).encode())
        return scenario

    def _check_same_job(self) -> None:
        """A run dir belongs to one job: refuse to resume it with a different training
        config (eval/output/tune may change; they do not change trained models)."""
        path = self.dir / "job.yaml"
        keep = ("name", "seed", "data", "scenario", "model", "method", "memory", "train")
        mine = {k: v for k, v in to_dict(self.job).items() if k in keep}
        if path.is_file():
            import yaml

            theirs = yaml.safe_load(path.read_text()) or {}
            theirs = {k: v for k, v in to_dict(parse_job(theirs, str(path))).items() if k in keep}
            diff = [k for k in keep if mine.get(k) != theirs.get(k)]
            if diff and (self.dir / "models").exists():
                raise ConfigError(
                    f"{self.dir}: run dir holds models of a different job (fields differ: "
                    f"{', '.join(diff)}); use another output.root or name, or delete it"
                )
        atomic_write_bytes(path, dump_job(self.job).encode())

    def _check_external_old_model(self) -> None:
        """BCT's ``old_model_dir`` may hold another backbone, never another embedding
        dimension: fail here, before any worker starts."""
        external = getattr(self.params, "old_model_dir", None)
        if not external:
            return
        from distcl.train.modeling import read_meta

        sig = read_meta(external)["signature"]
        if sig["embedding_dim"] != self.job.model.embedding_dim:
            raise ConfigError(
                f"method.params.old_model_dir: {external} embeds in {sig['embedding_dim']} "
                f"dimensions but model.embedding_dim={self.job.model.embedding_dim}; "
                "compatible training needs equal embedding dimensions"
            )

    @property
    def run_id(self) -> str:
        return f"{self.job.name}-{hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:8]}"

    def memory_actor(self):
        """The run's memory service; the handle is kept here because a named actor that
        no handle references is garbage-collected."""
        from distcl.memory.service import create_memory_service

        if getattr(self, "_memory", None) is None:
            m = self.job.memory
            self._memory = create_memory_service(
                self.run_id,
                str(self.dir / "memory"),
                m.per_class,
                m.total,
                self.job.seed,
                namespace=NAMESPACE,
            )
        return self._memory

    # -- one task --------------------------------------------------------------------
    def context(self, t: int) -> TaskContext:
        task = self.scenario.tasks[t]
        old = self.scenario.tasks[t - 1].seen_classes if t > 0 else ()
        ctx = TaskContext(
            task=t, num_tasks=self.scenario.num_tasks, num_classes=self.num_classes,
            new_classes=tuple(c for c in task.seen_classes if c not in old),
            seen_classes=task.seen_classes, old_classes=tuple(old),
            embedding_dim=self.job.model.embedding_dim,
        )  # fmt: skip
        if t > 0 and self.needs.class_means:
            means = ray.get(self.memory_actor().running_class_means.remote())
            if means:
                labels = sorted(means)
                ctx.class_means = torch.from_numpy(np.stack([means[c] for c in labels]))
                ctx.class_mean_labels = torch.tensor(labels, dtype=torch.int64)
        if self.old_model_dir(t) and self.needs.old_class_means:
            out = embed_paths(
                self.job,
                Path(self.old_model_dir(t)),
                self.train_shards(t),
                self.num_classes,
                self.in_channels,
            )
            labels = sorted(set(out["labels"].tolist()))
            ctx.old_class_means = torch.from_numpy(
                np.stack([out["emb"][out["labels"] == c].mean(0) for c in labels])
            )
            ctx.old_class_mean_labels = torch.tensor(labels, dtype=torch.int64)
        return ctx

    def old_model_dir(self, t: int) -> str | None:
        """The frozen old model of task t: model t-1, or for t=0 an external model to be
        compatible with (BCT's ``old_model_dir``)."""
        if t > 0:
            return str(self.model_dir(t - 1))
        external = getattr(self.params, "old_model_dir", None)
        return str(external) if external else None

    def model_dir(self, t: int) -> Path:
        return self.dir / "models" / str(t)

    def train_shards(self, t: int) -> list[Path]:
        tasks = list(range(t + 1)) if self.needs.all_data else t
        return shard_paths(self.shards_dir, tasks, "train")

    def train_task(self, t: int) -> list[dict]:
        from ray.train import (
            CheckpointConfig,
            FailureConfig,
            LoggingConfig,
            RunConfig,
            ScalingConfig,
        )
        from ray.train.torch import TorchTrainer

        from distcl.train.loop import train_task_loop
        from distcl.train.progress import ProgressBoard, show_progress

        job = self.job
        epochs = job.train.epochs_for(t)
        paths = self.train_shards(t)
        use_gpu = {"yes": True, "no": False}.get(job.train.use_gpu)
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= job.train.workers
        board = ProgressBoard.options(
            name=f"progress-{self.run_id}", namespace=NAMESPACE, get_if_exists=True
        ).remote()
        ray.get(board.update.remote(epoch=0, step=0, steps=1, record=None))
        config = {
            "job": job, "ctx": self.context(t), "num_classes": self.num_classes,
            "in_channels": self.in_channels, "epochs": epochs,
            "prev_model_dir": str(self.model_dir(t - 1)) if t > 0 else None,
            "old_model_dir": self.old_model_dir(t),
            "train_shards": paths, "train_count": sum(self.counts[p.name] for p in paths),
            "memory_actor": self.run_id if self.uses_memory else None,
            "progress_actor": f"progress-{self.run_id}", "namespace": NAMESPACE,
            "fault": os.environ.get("DISTCL_FAULT"),
        }  # fmt: skip
        trainer = TorchTrainer(
            train_task_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=job.train.workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": job.train.cpus_per_worker,
                                      **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(
                name=f"task{t}",
                storage_path=str((self.dir / "ray").resolve()),
                failure_config=FailureConfig(max_failures=job.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING"),  # progress bar, not logs
            ),
        )  # fmt: skip
        title = f"task {t + 1}/{self.scenario.num_tasks} ({job.method.name})"
        t_start = time.perf_counter()
        with show_progress(board, title, epochs, enabled=self.progress):
            result = trainer.fit()
        if result.error:
            raise result.error
        train_s = time.perf_counter() - t_start
        with result.checkpoint.as_directory() as d:
            history = json.loads((Path(d) / "history.json").read_text())
            model = build_model(job, self.num_classes, self.in_channels)
            meta = model_meta(job, model, t, self.digest)
            meta["workers"] = job.train.workers
            meta["use_gpu"] = bool(use_gpu)
            meta["train_s"] = train_s  # wall time of the Train run, start-up included
            save_model_dir(self.dir, t, Path(d) / "model.pt", history, meta)
        last = history[-1]
        self.log(
            f"task {t + 1}: train_acc={last['train_acc']:.3f} "
            f"{last['images_per_s']:.0f} img/s "
            + " ".join(f"{k[5:]}={v:.3f}" for k, v in last.items() if k.startswith("loss/"))
        )
        return history

    def end_task(self, t: int) -> None:
        """Embedding passes of model t: evaluation set + stored gallery, memory, means."""
        from distcl.gallery.store import write_embeddings

        marker = self.model_dir(t) / "post.json"
        if marker.is_file():
            return
        t0 = time.perf_counter()
        gallery = shard_paths(self.shards_dir, range(self.scenario.num_tasks), "gallery")
        ev = embed_paths(self.job, self.model_dir(t), gallery, self.num_classes, self.in_channels)
        write_embeddings(
            self.dir / "eval" / "embeddings",
            t,
            "eval",
            ev["keys"].astype(str),
            ev["labels"],
            ev["tasks"],
            ev["emb"],
        )
        arrived = ev["tasks"] == t  # the stale gallery: items arriving now, by model t
        write_embeddings(
            self.dir / "gallery",
            t,
            f"task{t}",
            ev["keys"][arrived].astype(str),
            ev["labels"][arrived],
            ev["tasks"][arrived],
            ev["emb"][arrived],
        )
        if self.uses_memory:
            self._update_memory(t)
        atomic_write_bytes(
            marker,
            json.dumps(
                {"embed_s": time.perf_counter() - t0, "eval_items": len(ev["keys"])}
            ).encode(),
        )

    def _update_memory(self, t: int) -> None:
        from distcl.memory.selection import per_class_budget, select_exemplars

        actor = self.memory_actor()
        paths = shard_paths(self.shards_dir, t, "train")
        tr = embed_paths(self.job, self.model_dir(t), paths, self.num_classes, self.in_channels)
        if self.needs.class_means:
            ray.get(actor.update_class_means.remote(tr["labels"], tr["emb"], key=f"task{t}"))
        if self.needs.replay_fraction <= 0:
            return
        m = self.job.memory
        n_seen = len(self.scenario.tasks[t].seen_classes)
        budget = per_class_budget(n_seen, m.per_class, m.total)
        chosen = select_exemplars(
            tr["labels"], tr["emb"], budget, m.selection, self.job.seed * 100 + t
        )
        rows = (
            np.concatenate([chosen[c] for c in sorted(chosen)]) if chosen else np.zeros(0, np.int64)
        )
        keys = tr["keys"][rows].astype(str).tolist()
        found = {}
        for part in ray.get([_collect_images.remote([str(p)], keys) for p in paths]):
            found.update(part)
        images = np.stack([found[k] for k in keys])
        ray.get(actor.commit.remote(t, keys, images, tr["labels"][rows], tr["emb"][rows]))

    # -- the whole sequence ----------------------------------------------------------
    def run(self) -> dict:
        scenario = self.prepare()
        if self.uses_memory:
            self.memory_actor()  # workers look it up by name from the first task on
        timings = {}
        for t in range(scenario.num_tasks):
            if is_model_done(self.dir, t):
                self.log(f"task {t + 1}/{scenario.num_tasks}: done, skipped")
            else:
                t0 = time.perf_counter()
                self.train_task(t)
                timings[t] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.end_task(t)
            self.log(
                f"task {t + 1}: wall {timings.get(t, 0):.1f}s training, "
                f"{time.perf_counter() - t0:.1f}s end-of-task embedding"
            )
        return {"run_dir": str(self.dir), "train_s": timings}


def run_job(job: JobConfig, progress: bool = True, evaluate: bool = True, log=print) -> dict:
    """Train every task of ``job`` (resuming), then evaluate and write the report."""
    init_ray()
    run = Run(job, progress=progress, log=log)
    out = run.run()
    if evaluate:
        from distcl.eval.evaluate import evaluate_run

        out["eval"] = evaluate_run(run.dir, log=log)
    return out

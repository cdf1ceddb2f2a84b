"""The per-worker loop of a whole task sequence (runs inside Ray Train workers).

One CPU:   train.workers=1                       (gloo, a single process group of 1)
Many CPUs: train.workers=N                       (gloo DDP over N Ray actors)
GPUs:      train.workers=N, train.use_gpu=auto   (nccl DDP, one GPU per worker)

One ``TorchTrainer`` runs every remaining task: Ray Train starts once per run, not per task.
For task t each worker
  1. prepares the task (``prepare_task``: the frozen old model t-1, the method's per-task
     inputs: class means, the memory snapshot for local replay sampling);
  2. trains its epochs, streaming its share of task t's shards; every epoch ends with a
     checkpoint of (task, epoch, model, optimiser), so a restarted worker group resumes there;
  3. rank 0 saves ``models/<t>/`` (atomic); every rank then does the end-of-task work on its
     own device (``distcl.train.endtask``): embeds its exact share of the evaluation set and
     writes its own Parquet parts, class statistics are all-reduced, exemplars are selected
     by the memory service. Rank 0 marks the task done and every rank reports it.
A finished task (``models/<t>/done.json``) is never trained or embedded again.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from distcl import faults, raycompat
from distcl.catalog import model_at
from distcl.config import JobConfig
from distcl.data.readers import train_batches
from distcl.data.shards import batches_per_epoch
from distcl.memory.selection import BalancedSampler
from distcl.methods.base import Batch
from distcl.rundir import RunDir
from distcl.tracking import WorkerTracker
from distcl.train import endtask
from distcl.train.modeling import (
    build_method,
    build_model,
    load_frozen_model,
    load_model_dir,
    model_meta,
    save_model_dir,
)
from distcl.train.plan import RunPlan
from distcl.train.precision import Precision, resolve_precision
from distcl.train.step import TrainStep


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per sample + a random shift of up to 2 px per batch."""
    flip = torch.rand(images.shape[0], generator=gen, device="cpu") < 0.5
    images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    h, w = images.shape[2:]
    return padded[:, :, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def global_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, differentiable (gradients reach every
    rank's rows): batch-spanning loss terms see the global batch."""
    import warnings

    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dist_nn.all_gather(t.contiguous()))


def optimise(step, batch: Batch, opt, precision: Precision, scaler=None) -> tuple:
    """One optimiser step of ``step`` (a :class:`~distcl.train.step.TrainStep`, maybe in
    DDP) on ``batch``: the forward passes and loss terms under ``precision``'s autocast (fp32:
    none, so the step is bitwise what it is without autocast), backward (scaled for fp16),
    step. Returns (named terms, their sum, the new model's logits detached)."""
    with precision.autocast():
        terms = step(batch)
    logits = terms.pop("_logits")
    loss = sum(terms.values())
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return terms, loss, logits


class Worker:
    """One Train worker's view of the run: rank, device, the plan and the run directory."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.job: JobConfig = plan.job
        self.rd = RunDir(plan.run_dir)
        tc = ray.train.get_context()
        self.rank, self.world = tc.get_world_rank(), tc.get_world_size()
        self.device = ray.train.torch.get_device()  # this rank's GPU, or the CPU
        self.precision = resolve_precision(self.job.train.precision, self.device)
        self.distributed = dist.is_available() and dist.is_initialized() and self.world > 1
        self.gather = global_gather if self.distributed else None
        if self.distributed:
            # The process's first DistributedDataParallel imports torch._dynamo (~0.8 s on
            # an idle core, 1.5 s with two workers on two cores): a start-up cost of the
            # worker, paid here once, not inside the first task's timings.
            import torch._dynamo  # noqa: F401
        self.loaders = self.job.train.loaders()  # DataLoader processes that read and decode
        self.memory = plan.memory  # a MemoryService (its shards' handles) or None
        self.progress = plan.progress if self.rank == 0 else None  # a RunProgress
        self.tracker = WorkerTracker(plan.tracking, self.rank)  # rank 0 logs, others no-op

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # -- the sequence ----------------------------------------------------------------
    def run(self) -> dict:
        job, plan = self.job, self.plan
        torch.set_num_threads(job.train.threads())
        torch.manual_seed(job.seed)  # the same initial model in every run (DDP: rank 0's)
        first = self.rd.finished_tasks()
        model = self._model(max(first - 1, 0))
        if first > 0:
            load_model_dir(model, self.rd.model(first - 1))  # continue from the last model
        state = _load_checkpoint(ray.train.get_checkpoint(), self.device)
        timings, started = {}, time.time()
        for t in range(first, plan.upto):
            if t > 0 and model_at(job, t) != model_at(job, t - 1):  # model.upgrades
                torch.manual_seed(job.seed * 1_000_003 + t)  # a new architecture, from scratch
                model = self._model(t)
            torch.manual_seed(job.seed * 1000 + t * 10 + self.rank)
            t0 = time.perf_counter()
            parts: dict[str, float] = {}
            if self.rd.trained(t):  # trained before a crash in its end-of-task work
                load_model_dir(model, self.rd.model(t))
            else:
                resume = state if state and state["task"] == t else None
                parts = self.train_task(t, model, resume)
            t1 = time.perf_counter()
            info = endtask.finish_task(self, t, model.eval())
            timings[t] = {"train_s": t1 - t0, "end_task_s": time.perf_counter() - t1,
                          **parts, **info}  # fmt: skip
            if self.progress is not None:  # the driver logs the task now, not at the end
                self.progress.task_done(t, timings[t])
            self.tracker.log(timings[t], step=t, prefix="task.")
            metrics = {"task": t, "task_done": 1, **timings[t]}
            if self.rank == 0 and plan.score_fn:  # e.g. a tuning trial's row
                metrics.update(plan.score_fn(str(self.rd.root), t))
            t2 = time.perf_counter()
            if plan.score_fn and t + 1 < plan.upto:
                # A tuning trial: every rank waits here for rank 0, which waits for Tune's
                # decision (distcl.tune.trial.TuneLink), so a stopped trial ends between two
                # tasks. Nothing else reads this report, and each costs a controller poll.
                ray.train.report(metrics)
            timings[t]["report_s"] = time.perf_counter() - t2  # waits for the controller
        self.tracker.close()
        return {"rank": self.rank, "world": self.world, "timings": timings,
                "tasks_started_at": started, "tasks_ended_at": time.time()}  # fmt: skip

    def _model(self, t: int):
        """A freshly initialised model of task t's architecture, in its memory layout."""
        plan = self.plan
        return self.precision.model(build_model(self.job, plan.num_classes, plan.in_channels, t))

    # -- one task ----------------------------------------------------------------------
    def prepare_task(self, t: int, model) -> tuple:
        """The task's context, the frozen old model and the replay snapshot."""
        ctx = endtask.task_context(self, t)
        method = build_method(self.job, ctx)
        needs = self.plan.needs  # the method's, replay share resolved
        task = self.plan.tasks[t]
        old_model = None
        if task.old_model_dir and (needs.old_model or self.job.method.align):
            old_model = load_frozen_model(task.old_model_dir, self.job).to(self.device)
            old_model = self.precision.model(old_model)
            if needs.old_class_means:
                ctx.old_class_means, ctx.old_class_mean_labels = endtask.class_means(
                    self, old_model, task.train_shards
                )
            ctx.extras.update(method.begin_task(old_model))
        snapshot = None
        if needs.replay_fraction > 0 and self.memory is not None and ctx.old_classes:
            snapshot = self.memory.snapshot()  # once per task: no actor call per step
            if len(snapshot["labels"]) == 0:
                snapshot = None
        return ctx, method, old_model, snapshot

    def train_task(self, t: int, model, resume: dict | None) -> dict[str, float]:
        """Train task t; returns where its time outside the epochs' loops went (seconds):
        ``prepare_s`` (method, old model, replay snapshot, DDP wrap, optimiser),
        ``checkpoint_s`` (the epochs' checkpoints, all but the last), ``save_s`` (model t
        written, the barrier, every rank reloading it). The epochs' own are in the history."""
        job, plan = self.job, self.plan
        task = plan.tasks[t]
        t_prep = time.perf_counter()
        ctx, method, old_model, snapshot = self.prepare_task(t, model)
        step = TrainStep(model, method, job.method.align, ctx, old_model)
        # Learned parts of a method or alignment term may get no gradient in a step (e.g. no
        # memory rows in the batch): only then does DDP need to look for unused parameters.
        extra_params = any(True for _ in step.method.parameters()) or len(step.align) > 0
        step = ray.train.torch.prepare_model(
            step, parallel_strategy_kwargs={"find_unused_parameters": extra_params}
        )
        inner = step.module if hasattr(step, "module") else step
        opt = torch.optim.SGD(
            [p for p in step.parameters() if p.requires_grad],
            lr=job.train.lr_for(t),
            momentum=job.train.momentum,
            weight_decay=job.train.weight_decay,
        )
        epochs = job.train.epochs_for(t)
        bsz = job.train.batch_size_per_worker
        n_batches = batches_per_epoch(task.train_count, self.world, bsz)
        total_steps = epochs * n_batches
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total_steps) / total_steps))
        )
        start_epoch, history = 0, []
        if resume:  # a restarted worker group: continue after the last reported epoch
            inner.load_state_dict(resume["step"])
            opt.load_state_dict(resume["opt"])
            sched.load_state_dict(resume["sched"])
            start_epoch, history = resume["epoch"] + 1, resume["history"]
        n_mem, sampler = 0, None
        if snapshot is not None:
            sampler = BalancedSampler(snapshot["labels"])
            frac = plan.needs.replay_fraction  # the method's, or memory.replay_fraction
            n_mem = max(1, round(bsz * frac / (1 - frac)))
        scaler = self.precision.scaler()  # fp16: dynamic loss scaling
        parts = {"prepare_s": time.perf_counter() - t_prep, "checkpoint_s": 0.0}
        for epoch in range(start_epoch, epochs):
            # Every random stream restarts per (task, epoch, rank): an epoch resumed from a
            # checkpoint draws exactly what it drew in a run that never crashed.
            torch.manual_seed(job.seed * 100_003 + t * 1009 + epoch * 31 + self.rank)
            sample_rng = np.random.default_rng([job.seed, t, epoch, self.rank, 7919])
            gen = torch.Generator().manual_seed(
                job.seed * 100_003 + t * 1009 + epoch * 31 + 17 * (self.rank + 1)
            )
            if epoch > 0:  # a checkpoint of this task exists
                faults.pause_point(plan.pause, "epoch", t)
            step.train()
            sums: dict[str, float] = {}
            correct = seen = 0
            t0 = t_first = time.perf_counter()
            for b, (images, labels, _keys) in enumerate(
                train_batches(
                    task.train_paths, task.train_count, self.rank, self.world, bsz,
                    job.seed * 31 + t, epoch, loader_workers=self.loaders,
                    pin_memory=self.device.type == "cuda",
                )
            ):  # fmt: skip
                faults.maybe_exit(plan.fault, t, epoch, b, n_batches)
                images, labels = torch.as_tensor(images), torch.as_tensor(labels)
                from_memory = torch.zeros(len(labels), dtype=torch.bool)
                if n_mem:
                    rows = sampler.sample(n_mem, sample_rng)
                    images = torch.cat([images, torch.from_numpy(snapshot["images"][rows])])
                    labels = torch.cat([labels, torch.from_numpy(snapshot["labels"][rows])])
                    from_memory = torch.cat([from_memory, torch.ones(n_mem, dtype=torch.bool)])
                # Augmenting (a flip and a shift of the whole batch, replay rows included) is a
                # tensor op on the device; decoding, the CPU cost, ran in the loader workers.
                x = images.to(self.device, non_blocking=True).float().div_(255.0)
                if job.train.augment:
                    x = _augment(x, gen)
                x = self.precision.images(x)  # channels-last on a GPU
                batch = Batch(
                    x,
                    labels.to(self.device),
                    from_memory.to(self.device),
                    gather=self.gather,
                )
                terms, loss, logits = optimise(step, batch, opt, self.precision, scaler)
                sched.step()
                if b == 0:  # what comes after is steady state (loaders, first step warm)
                    t_first = time.perf_counter()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                cur = ~batch.from_memory
                pred = method.seen_logits(logits[cur]).argmax(1)
                correct += int((pred == batch.labels[cur]).sum())
                seen += int(cur.sum())
                if self.progress is not None and b % 5 == 0:
                    self.progress.update(
                        task=t, epoch=epoch, step=b + 1, steps=n_batches, loss=float(loss.detach())
                    )
            record = self._epoch_record(t, epoch, sums, correct, seen, n_batches, n_mem, t0,
                                        t_first)  # fmt: skip
            record["resumed"] = bool(resume) and epoch == start_epoch  # after a checkpoint
            history.append(record)
            step_no = sum(job.train.epochs_for(k) for k in range(t)) + epoch  # epochs so far
            self.tracker.log(record, step=step_no, prefix="train.")
            if self.progress is not None:
                self.progress.update(
                    task=t, epoch=epoch, step=n_batches, steps=n_batches, record=record
                )
            if epoch + 1 < epochs:  # the last epoch's state is model t, saved below
                t_ckpt = time.perf_counter()
                self._report_epoch(record, inner, opt, sched, t, epoch, history)
                parts["checkpoint_s"] += time.perf_counter() - t_ckpt
        t_save = time.perf_counter()
        if self.rank == 0:
            meta = model_meta(job, model, t, plan.scenario_digest)
            meta.update(workers=self.world, device=str(self.device), loader_workers=self.loaders,
                        precision=self.precision.name)  # fmt: skip
            arrays = {}
            if model.compat is not None:  # the engine maps this model's rows with it (numpy)
                arrays["compat"] = model.compat.weight.detach().float().cpu().numpy()
            with tempfile.TemporaryDirectory() as d:
                torch.save(model.state_dict(), Path(d) / "model.pt")
                save_model_dir(self.rd.root, t, Path(d) / "model.pt", history, meta, arrays)
            faults.pause_point(plan.pause, "saved", t)
        self.barrier()  # model t is on disk for every rank
        # Every rank continues with the saved model: DDP keeps parameters equal, but each
        # rank's BatchNorm running statistics moved with its own last batches.
        load_model_dir(model, self.rd.model(t))
        parts["save_s"] = time.perf_counter() - t_save
        return parts

    def _epoch_record(self, t, epoch, sums, correct, seen, n_batches, n_mem, t0,
                      t_first) -> dict:  # fmt: skip
        """Global epoch statistics: sums over ranks (a collective: every rank runs it).

        Throughput is of the steady state, after the epoch's first step (which waits for
        the loaders to start and, in a run's first epoch, warms DDP up), as ``distcl bench
        train`` measures it: ``new_images_per_s`` counts the task's own images,
        ``rows_per_s`` every row a step processed (replayed exemplars too)."""
        now = time.perf_counter()
        elapsed = now - t0
        steady_batches, steady_s = n_batches - 1, now - t_first
        if steady_batches < 1:  # one batch per epoch: nothing but its first step
            steady_batches, steady_s = n_batches, elapsed
        keys = sorted(sums)
        stats = torch.tensor([sums[k] for k in keys] + [correct, seen], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(stats)
        bsz = self.job.train.batch_size_per_worker
        per_s = steady_batches * self.world / steady_s
        return {
            "task": t, "epoch": epoch,
            **{f"loss/{k}": float(stats[i]) / (n_batches * self.world) for i, k in enumerate(keys)},
            "train_acc": float(stats[-2] / max(stats[-1], 1)),
            "new_images_per_s": bsz * per_s, "rows_per_s": (bsz + n_mem) * per_s,
            "replay_rows": n_mem, "epoch_s": elapsed,
        }  # fmt: skip

    def _report_epoch(self, record, inner, opt, sched, t, epoch, history) -> None:
        """Ray Train's checkpoint of (task t, epoch): the step's state (model, method,
        alignment terms), optimiser, scheduler and history, written by rank 0; every rank
        reports. Not taken after a task's last epoch: that state is model t, which
        :meth:`train_task` writes next (a crash between the two trains that epoch again,
        exactly: its random streams are seeded). That is one checkpoint write per task less
        (on a cluster, the model and optimiser state to shared storage) and one report less
        (each waits for a controller poll; the last held the run's end one poll longer)."""
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                state = {"step": inner.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "task": t, "epoch": epoch}  # fmt: skip
                torch.save(state, Path(d) / "step.pt")
                (Path(d) / "history.json").write_text(json.dumps(history))
                (Path(d) / "config.json").write_text(json.dumps(self.plan.train_digest))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(record, checkpoint=checkpoint)


def _load_checkpoint(ckpt, device) -> dict | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "step.pt", map_location=device, weights_only=True)
        state["history"] = json.loads((Path(d) / "history.json").read_text())
    return state


def train_sequence_loop(loop_config: dict) -> dict:
    """Every remaining task on this worker (through :func:`distcl.train.trainer.run_sequence`,
    Ray Train's ``train_loop_per_worker``); returns rank 0's timings.
    ``loop_config["plan"]``: an object ref of the run's :class:`RunPlan` (``Run.train``)."""
    raycompat.quiet_train_logs()
    return Worker(ray.get(loop_config["plan"])).run()

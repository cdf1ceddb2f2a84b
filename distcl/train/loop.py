"""The per-worker training loop of one task (runs inside Ray Train workers).

One CPU:   train.workers=1                       (gloo, a single process group of 1)
Many CPUs: train.workers=N                       (gloo DDP over N Ray actors)
GPUs:      train.workers=N, train.use_gpu=auto   (nccl DDP, one GPU per worker)

Each worker streams its share of the task's WebDataset shards (``train_batches``: equal
batch counts on every rank), mixes in replay batches from the memory actor when the
method asks for them, and calls the method for named loss terms; the sum is
backpropagated. Every epoch ends with ``ray.train.report`` carrying a checkpoint (rank 0
writes it), so a worker group restarted by ``FailureConfig`` resumes from the last epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distcl.config import JobConfig
from distcl.data.shards import batches_per_epoch, train_batches
from distcl.methods.base import Batch, TaskContext
from distcl.train.modeling import build_method, build_model, load_frozen_model, load_model_dir


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per sample + a random shift of up to 2 px per batch."""
    flip = torch.rand(images.shape[0], generator=gen, device="cpu") < 0.5
    images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    h, w = images.shape[2:]
    return padded[:, :, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def _maybe_inject_fault(spec: str | None, task: int, epoch: int) -> None:
    """Test hook: DISTCL_FAULT=<marker>:<task>:<epoch> (set in the driver's environment)
    kills this worker process once, at the start of that epoch."""
    if not spec:
        return
    marker, t, e = spec.rsplit(":", 2)
    if int(t) == task and int(e) == epoch and not os.path.exists(marker):
        Path(marker).write_text("fired")
        os._exit(1)


def _quiet_train_logs() -> None:
    """Per-epoch reports are drawn by the driver's progress bar, not logged by each worker.
    Ray Train V2 logs "Reporting training result ..." on a logger named after its file."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: its logs stay
        pass


def train_task_loop(config: dict) -> dict:
    """Ray Train ``train_loop_per_worker`` for one task; returns rank 0's summary."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    _quiet_train_logs()
    job: JobConfig = config["job"]
    ctx: TaskContext = config["ctx"]
    task = ctx.task
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    threads = job.train.threads_per_worker or max(1, int(job.train.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(job.seed * 1000 + task * 10 + rank)
    device = ray.train.torch.get_device()

    model = build_model(job, config["num_classes"], config["in_channels"])
    old_model = None
    if config["prev_model_dir"]:
        load_model_dir(model, config["prev_model_dir"])  # continue from model t-1
    method = build_method(job, ctx)
    needs = method.needs()
    old_dir = config["old_model_dir"]
    if old_dir and (needs.old_model or job.method.align):
        old_model = load_frozen_model(old_dir, job).to(device)
        if old_model.embedding_dim != model.embedding_dim:
            raise ValueError(
                f"{old_dir}: old model embedding_dim={old_model.embedding_dim} but "
                f"model.embedding_dim={model.embedding_dim}: compatible training needs equal "
                "embedding dimensions"
            )
        ctx.extras.update(method.begin_task(old_model))

    from distcl.train.step import TrainStep

    step = TrainStep(model, method, job.method.align, ctx, old_model)
    # Learned parts of a method or alignment term may get no gradient in a step (e.g. no
    # memory rows in the batch): only then does DDP need to look for unused parameters.
    extra_params = any(True for _ in step.method.parameters()) or len(step.align) > 0
    step = ray.train.torch.prepare_model(
        step, parallel_strategy_kwargs={"find_unused_parameters": extra_params}
    )
    inner = step.module if hasattr(step, "module") else step
    params = [p for p in step.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params,
        lr=job.train.lr_for(task),
        momentum=job.train.momentum,
        weight_decay=job.train.weight_decay,
    )
    epochs = config["epochs"]
    total = config["train_count"]
    bsz = job.train.batch_size_per_worker
    n_batches = batches_per_epoch(total, world, bsz)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: 0.5 * (1 + math.cos(math.pi * min(i, epochs * n_batches) / (epochs * n_batches))),
    )

    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # a restarted worker group: resume after the last reported epoch
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "step.pt", map_location=device, weights_only=True)
            inner.load_state_dict(state["step"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start_epoch = state["epoch"] + 1
            history = json.loads((Path(d) / "history.json").read_text())

    replay = None
    n_mem = 0
    if needs.replay_fraction > 0 and config.get("memory_actor") and ctx.old_classes:
        from distcl.memory.service import ReplayPrefetcher, get_memory_service

        frac = job.memory.replay_fraction or needs.replay_fraction
        n_mem = max(1, round(bsz * frac / (1 - frac)))
        actor = get_memory_service(config["memory_actor"], namespace=config["namespace"])
        replay = ReplayPrefetcher(actor, n_mem, seed=job.seed * 7919 + task * 101 + rank)

    progress = None
    if rank == 0 and config.get("progress_actor"):
        import ray

        progress = ray.get_actor(config["progress_actor"], namespace=config["namespace"])

    gen = torch.Generator().manual_seed(job.seed + 17 * rank + 1000 * task)
    for epoch in range(start_epoch, epochs):
        _maybe_inject_fault(config.get("fault"), task, epoch)
        step.train()
        sums: dict[str, float] = {}
        correct = seen = 0
        t0 = time.perf_counter()
        replay_wait = 0.0
        for b, (images, labels, _keys) in enumerate(
            train_batches(
                config["train_shards"], total, rank, world, bsz, job.seed * 31 + task, epoch
            )
        ):
            from_memory = np.zeros(len(labels), bool)
            if replay is not None:
                tr = time.perf_counter()
                mem = replay.next()
                replay_wait += time.perf_counter() - tr
                images = np.concatenate([images, mem["images"]])
                labels = np.concatenate([labels, mem["labels"]])
                from_memory = np.concatenate([from_memory, np.ones(len(mem["labels"]), bool)])
            x = torch.from_numpy(images).to(device).float().div_(255.0)
            if job.train.augment:
                x = _augment(x, gen)
            batch = Batch(
                x, torch.from_numpy(labels).to(device), torch.from_numpy(from_memory).to(device)
            )
            terms = step(batch)
            logits = terms.pop("_logits")
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            cur = ~batch.from_memory
            pred = method.seen_logits(logits[cur]).argmax(1)
            correct += int((pred == batch.labels[cur]).sum())
            seen += int(cur.sum())
            if progress is not None and b % 5 == 0:
                progress.update.remote(
                    task=task, epoch=epoch, step=b + 1, steps=n_batches, loss=float(loss.detach())
                )
        elapsed = time.perf_counter() - t0
        # Global epoch statistics: sum over ranks (a collective: every rank runs it).
        keys = sorted(sums)
        stats = torch.tensor([sums[k] for k in keys] + [correct, seen], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and world > 1:
            dist.all_reduce(stats)
        n_images = (bsz + n_mem) * n_batches * world
        record = {
            "task": task, "epoch": epoch,
            **{f"loss/{k}": float(stats[i]) / (n_batches * world) for i, k in enumerate(keys)},
            "train_acc": float(stats[-2] / max(stats[-1], 1)),
            "images_per_s": n_images / elapsed,
            "replay_rows": n_mem, "replay_wait_s": replay_wait, "epoch_s": elapsed,
        }  # fmt: skip
        history.append(record)
        if progress is not None:
            progress.update.remote(
                task=task, epoch=epoch, step=n_batches, steps=n_batches, record=record
            )
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "step": inner.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "epoch": epoch,
                    },
                    Path(d) / "step.pt",
                )
                torch.save(inner.model.state_dict(), Path(d) / "model.pt")
                (Path(d) / "history.json").write_text(json.dumps(history))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(record, checkpoint=checkpoint)
    if replay is not None:
        replay.close()
    return {"history": history, "rank": rank, "world": world}

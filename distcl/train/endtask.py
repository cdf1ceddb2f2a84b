"""Per-task work done on the Train workers, on their own devices (GPU where present).

- ``task_context``: what a method needs to know of task t (classes; CVS's running class
  means from the memory service).
- ``class_means``: per-class mean embeddings over a task's training shards, each rank
  embedding its exact share and the sums all-reduced (BCT's old-model means of new classes).
- ``finish_task``: after model t is saved, every rank embeds its exact share of the
  evaluation set and writes its own Parquet parts (``eval/embeddings/model=<t>/part-<rank>``
  and, for the items arriving at t, ``gallery/model=<t>/part-<rank>``); for replay methods it
  embeds its share of task t's training items: class sums are all-reduced into CVS's E_c,
  the memory service selects the exemplars from the gathered candidates (labels and
  embeddings only), and only the chosen items' images travel to it. Rank 0 marks the task
  done. Nothing whose size grows with the data goes to the driver.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from distcl import faults, storage
from distcl.catalog import model_at
from distcl.data.readers import iter_items
from distcl.data.shards import decode_image, item_split
from distcl.gallery.store import write_embeddings
from distcl.memory.selection import per_class_budget
from distcl.methods.base import TaskContext
from distcl.placement import node_id
from distcl.train.embedding import embed_shards


def task_context(w, t: int) -> TaskContext:
    """The method's view of task t (built the same way on every rank)."""
    task = w.plan.tasks[t]
    dim = model_at(w.job, t).embedding_dim
    old_dim = (
        model_at(w.job, t - 1).embedding_dim if t > 0 else (dim if task.old_model_dir else None)
    )  # an external old model has the job's size
    ctx = TaskContext(
        task=t, num_tasks=w.plan.num_tasks, num_classes=w.plan.num_classes,
        new_classes=task.new_classes, seen_classes=task.seen_classes,
        old_classes=task.old_classes, embedding_dim=dim, old_dim=old_dim,
        dim_change=w.job.model.dim_change,
    )  # fmt: skip
    if t > 0 and w.plan.needs.class_means and w.memory is not None:
        means = w.memory.running_class_means(dim=old_dim)  # E_c in the old model's space
        if means:
            labels = sorted(means)
            ctx.class_means = torch.from_numpy(np.stack([means[c] for c in labels]))
            ctx.class_mean_labels = torch.tensor(labels, dtype=torch.int64)
    return ctx


def _class_sums(w, labels: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (sums (C, D) float64, counts (C,)) over every rank's rows (all-reduced)."""
    C, D = w.plan.num_classes, emb.shape[1]
    sums = np.zeros((C, D), np.float64)
    np.add.at(sums, labels, emb.astype(np.float64))
    counts = np.bincount(labels, minlength=C).astype(np.float64)
    both = torch.from_numpy(np.concatenate([sums, counts[:, None]], 1))
    if w.distributed:
        dist.all_reduce(both)
    return both[:, :D].numpy(), both[:, D].numpy()


def class_means(w, model, shards) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (K, D), labels (K,)) of the classes present in ``shards``, over all ranks."""
    out = embed_shards(model, shards, w.device, w.loaders, w.rank, w.world,
                       precision=w.precision)  # fmt: skip
    sums, counts = _class_sums(w, out["labels"], out["emb"])
    present = np.flatnonzero(counts > 0)
    means = sums[present] / counts[present, None]
    return torch.from_numpy(means.astype(np.float32)), torch.from_numpy(present)


def finish_task(w, t: int, model) -> dict:
    """The end-of-task work of task t on every rank (idempotent; see the module docstring)."""
    rd, plan = w.rd, w.plan
    t0 = time.perf_counter()
    if w.rank == 0:  # parts of an earlier attempt (maybe another world size) go first
        for root in (rd.eval_embeddings, rd.gallery):
            storage.delete_dir(root / f"model={t}")
    w.barrier()
    ev = embed_shards(model, plan.eval_shards, w.device, w.loaders, w.rank, w.world,
                      precision=w.precision)  # fmt: skip
    part = f"part-{w.rank}"
    if len(ev["keys"]):
        write_embeddings(
            rd.eval_embeddings, t, part, ev["keys"], ev["labels"], ev["tasks"], ev["emb"]
        )
        now = ev["tasks"] == t  # the stale gallery: items arriving now, embedded by model t
        if now.any():
            write_embeddings(rd.gallery, t, part, ev["keys"][now], ev["labels"][now],
                             ev["tasks"][now], ev["emb"][now])  # fmt: skip
    embed_s = time.perf_counter() - t0
    transform = {}
    if plan.needs.transform:  # FCT: h_t on the items with both rows, before task t's exemplars
        from distcl.train.transform import train_transform

        transform = train_transform(w, t, model)
    t_mem = time.perf_counter()
    if plan.uses_memory:
        _update_memory(w, t, model)
    counts = torch.tensor([len(ev["keys"])], dtype=torch.int64)
    nodes = [node_id()]
    if w.distributed:
        dist.all_reduce(counts)
        nodes = [None] * w.world
        dist.all_gather_object(nodes, node_id())
    if w.rank == 0:
        if int(counts) != plan.eval_count:
            raise RuntimeError(
                f"task {t}: the ranks embedded {int(counts)} evaluation items, the manifest "
                f"lists {plan.eval_count}"
            )
        info = {"embed_s": embed_s, "memory_s": time.perf_counter() - t_mem, **transform,
                "eval_items": int(counts), "workers": w.world, "nodes": nodes}  # fmt: skip
        rd.mark_done(t, info)
    w.barrier()
    return {"embed_s": embed_s, "end_task_items": int(counts)}


def shard_labels(
    shards: Sequence[tuple[str, int]], rank: int = 0, world: int = 1
) -> dict[str, np.ndarray]:
    """``embed_shards``' keys and labels of the same share of ``shards`` without decoding or
    embedding a sample; ``emb`` is (N, 0). For selections that do not look at features."""
    keys, labels = [], []
    for key, _data, lab, _meta in iter_items(item_split(shards, rank, world), decode=False):
        keys.append(key)
        labels.append(int(lab))
    return {"keys": np.asarray(keys, dtype=str), "labels": np.asarray(labels, np.int64),
            "emb": np.zeros((len(keys), 0), np.float32)}  # fmt: skip


def _update_memory(w, t: int, model) -> None:
    """Class means and exemplars of task t (selection on the memory service). Task t's
    training items are embedded only where something uses the features (class means,
    herding); random selection needs their labels only, and stores exemplars without
    embeddings (training replays images; nothing reads the stored features)."""
    job, plan, needs = w.job, w.plan, w.plan.needs
    task = plan.tasks[t]
    shards = task.memory_shards
    if needs.class_means or job.memory.selection != "random":
        tr = embed_shards(model, shards, w.device, w.loaders, w.rank, w.world,
                          precision=w.precision)  # fmt: skip
    else:
        tr = shard_labels(shards, w.rank, w.world)
    emb = tr["emb"]
    if needs.class_means:
        sums, counts = _class_sums(w, tr["labels"], emb)
        if w.rank == 0:
            w.memory.update_class_sums(sums, counts, key=f"task{t}")
    if needs.replay_fraction <= 0 and not needs.exemplars:
        return
    # Candidates: labels and embeddings of every rank (no images), in rank order.
    parts = [None] * w.world
    if w.distributed:
        dist.all_gather_object(parts, (tr["keys"], tr["labels"], emb))
    else:
        parts = [(tr["keys"], tr["labels"], emb)]
    chosen_keys = None
    if w.rank == 0:
        keys = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        embs = np.concatenate([p[2] for p in parts])
        m = job.memory
        budget = per_class_budget(len(task.seen_classes), m.per_class, m.total)
        rows = w.memory.select(labels, embs, budget, m.selection, job.seed * 100 + t)
        chosen_keys = (keys[rows].tolist(), labels[rows], embs[rows])
    box = [chosen_keys]
    if w.distributed:
        dist.broadcast_object_list(box, src=0)
    keys, labels, embs = box[0]
    wanted = set(keys)
    found = {}
    # Only the chosen items of this rank's share are decoded, read again.
    for key, data, _lab, _meta in iter_items(item_split(shards, w.rank, w.world), False):
        if key in wanted:
            found[key] = decode_image(data)
    gathered = [None] * w.world
    if w.distributed:
        dist.all_gather_object(gathered, found)
    else:
        gathered = [found]
    if w.rank == 0:
        images = {k: v for g in gathered for k, v in g.items()}
        stack = np.stack([images[k] for k in keys])
        faults.pause_point(plan.pause, "memory", t)
        n_seen = len(task.seen_classes)
        w.memory.commit(t, keys, stack, labels, embs, classes_seen=n_seen)

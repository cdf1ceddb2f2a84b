"""FCT's end-of-task work (method ``fct``): the transformation h_t of model t-1's rows into
model t's space, trained on the Train workers after model t is saved.

Every rank embeds its share of the items that have both rows (task t's training items, read
from its shards, and the memory's exemplars of the earlier tasks, whose images the memory
service holds) with the frozen models t-1 and t; nothing travels to the driver. h_t is then
trained data-parallel: each rank takes its share of every global batch, the gradients are
all-reduced (so every rank holds the same h), and rank 0 writes it into ``models/<t>/``:
``transform.npz`` (the numpy export the evaluation engine applies, ``distcl.eval.transforms``),
``transform.pt`` (the torch state) and ``transform.json`` (its signature, the loss terms per
epoch, the rows it learned from). Each file is written atomically, ``transform.npz`` last:
a crash leaves either no transformation (trained again, the same: every random stream is
seeded) or a whole one, which a restarted end-of-task finds and keeps.

Training (FCT's recipe): Adam (lr 5e-4, weight decay 2^-15), a global batch of 1024, a
cosine schedule after a linear warm-up of 1/16 of the epochs, BatchNorm in eval mode for the
second half of the epochs (FCT's ``switch_mode_to_eval``); the loss is FastFill's
(``distcl.losses.fastfill_loss``: per-item MSE and label-smoothed CE through model t's frozen
classifier, weighted by the sigma head's exp(-s), + s / 2), or FCT's plain MSE with
``sigma: false, disc_weight: 0``. The target rows are scaled by sqrt(d) (unit variance per
dimension), so the MSE and the CE weigh as they do on FastFill's unnormalised features; the
classifier sees h's output at the mean norm of model t's features. Augmentation is not used
(the rows h maps at search time are the stored, un-augmented ones).
"""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from distcl import storage
from distcl.data.shards import item_split
from distcl.eval.transforms import Transform
from distcl.losses import fastfill_loss
from distcl.models.transform import Transformation
from distcl.rundir import atomic_write
from distcl.train.embedding import embed_batch, embed_batches
from distcl.train.modeling import load_frozen_model


@torch.no_grad()
def _rows(old, new, images: np.ndarray, device, precision) -> tuple:
    """(old rows, new rows, new feature norms) of a uint8 image batch."""
    x = torch.as_tensor(images).to(device).float().div_(255.0)
    with precision.autocast():
        o = old.embed(x)
        out = new(x)
    return o.float().cpu(), out["emb"].float().cpu(), out["feat"].float().norm(dim=1).cpu()


def pairs(w, t: int, old, new) -> dict[str, torch.Tensor]:
    """This rank's (old, new, labels, feature norms) of task t's training items and of its
    share of the memory's exemplars."""
    task = w.plan.tasks[t]
    size = embed_batch(w.device)
    olds, news, norms, labels = [], [], [], []
    for images, _keys, lab, _tasks in embed_batches(
        item_split(task.memory_shards, w.rank, w.world), size
    ):  # fmt: skip
        for out, rows in zip((olds, news, norms), _rows(old, new, images, w.device, w.precision),
                             strict=True):  # fmt: skip
            out.append(rows)
        labels.append(torch.as_tensor(np.asarray(lab, np.int64)))
    if w.memory is not None:
        snap = w.memory.snapshot()  # exemplars of tasks < t (task t's are chosen after this)
        mine = np.arange(w.rank, len(snap["labels"]), w.world)
        for s in range(0, len(mine), size):
            rows = mine[s : s + size]
            for out, r in zip((olds, news, norms),
                              _rows(old, new, snap["images"][rows], w.device, w.precision),
                              strict=True):  # fmt: skip
                out.append(r)
            labels.append(torch.as_tensor(snap["labels"][rows].astype(np.int64)))
    d_old, d_new = old.embedding_dim, new.embedding_dim
    return {"old": _cat(olds, (0, d_old)), "new": _cat(news, (0, d_new)),
            "norm": _cat(norms, (0,)), "labels": _cat(labels, (0,)).long()}  # fmt: skip


def _cat(parts: list[torch.Tensor], empty: tuple[int, ...]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(empty)


def _schedule(warm: int, total: int):
    """A linear warm-up over ``warm`` steps, then a cosine decay to 0 at ``total``."""

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))

    return factor


def _sum(reduce, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if reduce is not None:
        reduce(t)
    return t.tolist()


def fit(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, p, n_total: int, seed: int,
        classify=None, reduce=None, rank: int = 0, world: int = 1,
        device="cpu") -> tuple[Transformation, list[dict]]:  # fmt: skip
    """Train h on this rank's rows ``x`` (n, d_old) -> ``y`` (n, d_new) with ``labels`` (n,)
    (FCT's recipe, the module docstring), ``p``: the method's parameters; ``n_total``: the
    rows of every rank; ``classify``: h's output -> the new classifier's logits (None: no
    discriminative term); ``reduce``: an in-place all-reduce (sum) across the ranks, None in
    one process. Returns h (in eval mode) and the loss terms per epoch."""
    n_local = len(x)
    torch.manual_seed(seed)  # the same initial h on every rank
    h = Transformation(x.shape[1], y.shape[1], p.inner_dim, p.sigma).to(device)
    opt = torch.optim.Adam(h.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    local_bs = max(2, math.ceil(p.batch_size / world))
    steps = max(1, math.ceil(n_total / (local_bs * world)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(max(1, p.epochs // 16) * steps, p.epochs * steps)
    )
    rng = np.random.default_rng([seed, rank, 8191])
    history = []
    for epoch in range(p.epochs):
        h.train(epoch < p.epochs / 2 or p.epochs == 1)  # FCT: BatchNorm frozen, 2nd half
        perm = rng.permutation(n_local)
        sums: dict[str, float] = {}
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            if n_local == 0:  # a rank without rows: its share of the gradient is zero
                terms = {}
                loss = sum(q.sum() * 0.0 for q in h.parameters())
            else:
                idx = perm[(s * local_bs + np.arange(local_bs)) % n_local]
                out, log_var = h(x[idx].to(device))
                logits = None if classify is None else classify(out)
                terms = fastfill_loss(out, y[idx].to(device), log_var, logits,
                                      labels[idx].to(device), p.disc_weight,
                                      p.label_smoothing)  # fmt: skip
                loss = sum(terms.values())
            loss.backward()
            if reduce is not None:
                for q in h.parameters():
                    if q.grad is not None:
                        reduce(q.grad)
                        q.grad /= world
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        keys = ("mse", "disc", "sigma")
        totals = _sum(reduce, *(sums.get(k, 0.0) for k in keys), float(n_local > 0) * steps)
        record = {k: v / max(totals[-1], 1) for k, v in zip(keys, totals[:-1], strict=True)}
        history.append({"epoch": epoch, **record})
    return h.eval(), history


def train_transform(w, t: int, model) -> dict:
    """h_t on every rank (see the module docstring); returns timings for the task's record.
    A no-op for t = 0 and where ``models/<t>/transform.npz`` is already written."""
    if t == 0 or not w.plan.needs.transform:
        return {}
    folder = w.rd.model(t)
    if storage.is_file(folder / "transform.npz"):  # a restarted end-of-task: already done
        return {}
    t0 = time.perf_counter()
    p, job = w.job.method.params, w.job
    old = load_frozen_model(w.rd.model(t - 1), job).to(w.device)
    old, new = w.precision.model(old), model.eval()
    data = pairs(w, t, old, new)
    n_local = len(data["labels"])
    reduce = dist.all_reduce if w.distributed else None
    n_total, norm_sum = _sum(reduce, n_local, float(data["norm"].sum()))
    if n_total < 2:
        raise RuntimeError(f"task {t}: {int(n_total)} item(s) to train the transformation on")
    scale_norm = norm_sum / n_total  # model t's mean feature norm: the classifier's input scale
    d_new = new.embedding_dim
    x_all = data["old"]  # as stored (h's first BatchNorm standardises its input anyway)
    # Model t's frozen classifier over the classes it has seen (label smoothing spreads mass
    # over every column: the unseen ones are left out, not masked to -inf).
    seen = torch.tensor(sorted(w.plan.tasks[t].seen_classes), dtype=torch.int64)
    labels = torch.searchsorted(seen, data["labels"])  # positions among the seen classes
    if (labels >= len(seen)).any() or (
        seen[labels.clamp(max=len(seen) - 1)] != data["labels"]
    ).any():
        raise RuntimeError(f"task {t}: an item's label is not among the classes seen so far")
    cols = seen.to(w.device)

    def classify(out: torch.Tensor) -> torch.Tensor:
        return new.head(out * (scale_norm / math.sqrt(d_new)))[:, cols]

    h, history = fit(x_all, data["new"] * math.sqrt(d_new), labels, p, int(n_total),
                     job.seed * 7919 + t, classify if p.disc_weight > 0 else None, reduce,
                     w.rank, w.world, w.device)  # fmt: skip
    seconds = time.perf_counter() - t0
    if w.rank == 0:
        h = h.eval().cpu()
        arrays = h.export()
        info = {"signature": h.signature(), "params": p.model_dump(), "rows": int(n_total),
                "feature_norm": scale_norm, "seconds": seconds, "history": history}  # fmt: skip
        with torch.no_grad():  # where the numbers came from: the export is h.eval()
            probe = x_all[: min(256, n_local)]
            if len(probe):
                got = Transform.from_arrays(arrays).raw(probe.numpy())
                info["export_max_abs_error"] = float(np.abs(got - h(probe)[0].numpy()).max())
        buf = io.BytesIO()
        torch.save(h.state_dict(), buf)
        atomic_write(folder / "transform.pt", buf.getvalue())
        atomic_write(folder / "transform.json", json.dumps(info, indent=1))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(folder / "transform.npz", buf.getvalue())  # last: the marker
    w.barrier()
    return {"transform_s": seconds}

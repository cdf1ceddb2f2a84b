"""A partial re-index of a run's stored gallery, for real (docs/backfill.md).

    distcl backfill runs/quickstart --apply --model 5 --fraction 0.3 --policy distance

The gallery as stored after the run's last finished task (each arrived item once: its
arrival row, or the row of an earlier re-index) is ordered by the policy
(``distcl.eval.backfill``); of its first ``floor(fraction * n)`` items, those whose row is
older than model ``T`` are re-embedded by model T from their images (read from the run's
shards) and written as rows of model T: ``gallery/model=<T>/backfill-<n>-<k>.parquet``. The
evaluation's stale gallery reads each item's latest row (the largest model <= the task it
evaluates; ``Engine._rows_kept``), so ``distcl eval`` and the stale-gallery curve see the
mixed gallery as stored; older rows are never rewritten.

Crash-safe and resumable: the chosen items are fixed first, in ``backfill/apply-<n>.json``
(written atomically before any embedding); each of the gallery's shards holding chosen items
is embedded by one Ray task (in this process without a Ray driver), on a GPU where the
cluster has one, and written as one Parquet part (atomically); a re-run of the same command
finds the unfinished apply, skips the parts already written and finishes; the plan is marked
done last. Every chosen item is in exactly one shard, so it is embedded exactly once.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from distcl import faults, storage
from distcl.eval import backfill as bf
from distcl.rundir import RunDir, atomic_write_json

POLICIES = ("random", "oldest", "distance", "class_mean", "uncertainty")


def _plans(rd: RunDir) -> list[tuple[int, dict]]:
    folder = rd.root / "backfill"
    out = []
    for e in storage.listdir(folder):
        if e.name.startswith("apply-") and e.name.endswith(".json"):
            out.append((int(e.name[6:-5]), storage.read_json(folder / e.name)))
    return sorted(out, key=lambda p: p[0])


def _check(rd: RunDir, model: int | None, fraction: float | None, policy: str,
           transform: bool = False) -> int:  # fmt: skip
    """Arguments checked before any work (each error names its field); returns T."""
    T = rd.finished_tasks()
    if model is None:
        raise ValueError("--model: give the model (1-indexed task) that re-embeds")
    if not 1 <= model <= T:
        raise ValueError(f"--model {model}: the run has finished models 1 .. {T}")
    if not storage.exists(rd.gallery):
        raise ValueError(f"{rd.root}: no stored gallery rows (gallery/) to re-index")
    if transform or policy == "uncertainty":
        from distcl.eval.transforms import has_chain, load_transforms

        hs = load_transforms(rd.root)
        if model < 2 or not has_chain(hs, 0, model - 1):
            what = "--transform" if transform else "--policy uncertainty"
            raise ValueError(f"{what} with --model {model} needs the transformations h_2 .. "
                             f"h_{model} (models/<t>/transform.npz, method fct)")  # fmt: skip
        if policy == "uncertainty" and hs[model - 1].sigma is None:
            raise ValueError(f"--policy uncertainty: h_{model} has no sigma head (sigma: false)")
    if transform:
        if fraction not in (None, 1.0):
            raise ValueError("--fraction: --transform maps every stored row older than "
                             f"--model (no images read); got {fraction}")  # fmt: skip
        return T
    if fraction is None or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--fraction: a share of the gallery in [0, 1], got {fraction}")
    if policy not in POLICIES:
        raise ValueError(f"--policy: {policy!r} cannot choose the items to re-embed (one of "
                         f"{', '.join(POLICIES)})")  # fmt: skip
    return T


def current_rows(engine, gallery, ranks: np.ndarray, columns=("item_id", "model", "embedding")):
    """(part path, canonical positions, record batch) of the stored gallery's current rows
    (each item's row of rank ``ranks``: ``Engine.stale_ranks``), part by part."""
    from distcl.gallery.store import is_transformed_part, iter_batches, sub_store

    for path, _info in gallery.parts:
        bonus = 0 if is_transformed_part(path) else 1
        for rb in iter_batches(sub_store(gallery, (path,)), columns=columns):
            codes = engine.cat.codes(rb["item_id"], path)
            keep = 2 * rb["model"].to_numpy().astype(np.int64) + bonus == ranks[codes]
            if keep.any():
                yield path, codes[keep], rb.filter(pa.array(keep))


def choose(run_dir, model: int, fraction: float, policy: str, seed: int) -> dict:
    """The plan of a re-index (0-indexed ``model``): the items to re-embed, from the gallery
    as stored after the run's last finished task. An item whose row is older than ``model``,
    or a row of ``model`` transformed by h (not embedded), is re-embedded."""
    from distcl.eval.engine import Engine, EvalSettings
    from distcl.gallery.store import batch_embeddings, iter_batches, open_store

    rd = RunDir(run_dir)
    job, scenario = rd.load_job(), rd.load_scenario()
    last = rd.finished_tasks() - 1
    engine = Engine(rd.root, EvalSettings.from_job(job, use_gpu=False), scenario)
    ranks = engine.stale_ranks(last)  # (N,) 2 * model (+ 1: embedded) of each stored row
    current, embedded = ranks // 2, ranks % 2 == 1
    members = np.flatnonzero((engine.cat.tasks >= 0) & (engine.cat.tasks <= last))
    n = len(members)
    gallery = open_store(rd.gallery)
    slot = np.full(len(engine.cat), -1, np.int64)
    slot[members] = np.arange(n)
    if policy == "random":
        order = bf.order_random(n, seed)
    elif policy == "oldest":
        order = bf.order_oldest(current[members], engine.cat.tasks[members], seed)
    elif policy == "uncertainty":  # FastFill: h's sigma of the item's arrival row
        from distcl.eval.transforms import chain, load_transforms

        hs = load_transforms(rd.root)
        keys = np.full(n, -np.inf)  # rows already of model T or later: last
        for rb in iter_batches(gallery, columns=("item_id", "task", "model", "embedding"),
                               filter=ds.field("task") == ds.field("model")):  # fmt: skip
            codes = engine.cat.codes(rb["item_id"], str(gallery.root))
            m = rb["model"].to_numpy()
            for src in np.unique(m[m < model]):
                sel = np.flatnonzero((m == src) & (slot[codes] >= 0))
                rows = batch_embeddings(rb)[sel]
                if src + 1 < model:
                    rows = chain(hs, int(src), model - 1)(rows)
                keys[slot[codes[sel]]] = hs[model].log_var(rows)
        order = bf._stable_desc(keys, seed)
    else:  # keys from the stored rows: the gallery held once (n x d), never per step
        rows = np.zeros((n, engine.dim), np.float32)
        for _path, codes, rb in current_rows(engine, gallery, ranks):
            emb = batch_embeddings(rb)
            rows[slot[codes], : emb.shape[1]] = emb
        if policy == "class_mean":
            keys = bf.class_mean_keys(rows, engine.cat.labels[members])
        else:  # distance to model T's row of the item (the run's evaluation embeddings)
            keys = np.zeros(n)
            for rb in iter_batches(engine.eval_store, model, columns=("item_id", "embedding")):
                codes = engine.cat.codes(rb["item_id"], str(engine.eval_store.root))
                keep = slot[codes] >= 0
                at = slot[codes[keep]]
                new = batch_embeddings(rb)[keep]
                keys[at] = bf.distance_keys(rows[at, : new.shape[1]], new)
        order = bf._stable_desc(keys, seed)
    first = members[order[: int(fraction * n)]]  # the policy's first share of the gallery
    todo = (current[first] < model) | ((current[first] == model) & ~embedded[first])
    chosen = first[todo]  # rows embedded by model T (or later) stay
    return {"model": model, "policy": policy, "fraction": fraction, "seed": seed,
            "gallery_items": n, "first": len(first), "already": len(first) - len(chosen),
            "items": sorted(engine.cat.ids.take(chosen).to_pylist()),
            "last_task": last, "done": False}  # fmt: skip


def _embed_shard(run_dir: str, plan_n: int, k: int, shard: tuple, wanted: list[str]) -> int:
    """Embed the chosen items of one shard with the plan's model and write them as one part
    (a Ray task, or in-process). Returns the rows written."""
    import torch

    from distcl.data.readers import iter_items
    from distcl.data.shardio import decode_image, item_split
    from distcl.gallery.store import write_embeddings
    from distcl.train.embedding import embed_batch
    from distcl.train.modeling import load_frozen_model
    from distcl.train.precision import resolve_precision

    rd = RunDir(run_dir)
    plan = storage.read_json(rd.root / "backfill" / f"apply-{plan_n}.json")
    job, model = rd.load_job(), plan["model"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(job.train.precision, device)  # as the end-of-task passes
    net = precision.model(load_frozen_model(rd.model(model), job).to(device))
    want = set(wanted)
    keys, labels, tasks, images = [], [], [], []
    for key, data, label, meta in iter_items(item_split([shard], 0, 1), decode=False):
        if key in want:
            keys.append(key)
            labels.append(int(label))
            tasks.append(int(meta["task"]))
            images.append(decode_image(data))
    if len(keys) != len(want):
        missing = sorted(want - set(keys))[:3]
        raise ValueError(f"{shard[0]}: chosen items {missing} are not in this shard")
    embs = []
    with torch.no_grad():
        size = embed_batch(device)
        for start in range(0, len(images), size):
            x = torch.as_tensor(np.stack(images[start : start + size])).to(device).float() / 255.0
            with precision.autocast():
                embs.append(net.embed(precision.images(x)).float().cpu().numpy())  # (B, d)
    write_embeddings(rd.gallery, model, f"backfill-{plan_n}-{k}", np.asarray(keys),
                     np.asarray(labels, np.int64), np.asarray(tasks, np.int32),
                     np.concatenate(embs))  # fmt: skip
    return len(keys)


def _shards_of(rd: RunDir, job, items: set[str]) -> list[tuple[int, tuple, list[str]]]:
    """(part number, shard, its chosen keys) of every gallery shard holding chosen items."""
    from distcl.data.readers import iter_items
    from distcl.data.shardio import item_split, load_manifest

    manifest = load_manifest(job.shards_dir)
    shards = [(str(storage.join(job.shards_dir, s["name"])), int(s["count"]))
              for s in manifest["shards"] if s["split"] == "gallery" and s["task"] >= 0
              and s["count"] > 0]  # fmt: skip
    out = []
    for k, shard in enumerate(shards):
        keys = [key for key, *_ in iter_items(item_split([shard], 0, 1), decode=False)
                if key in items]  # fmt: skip
        if keys:
            out.append((k, shard, keys))
    found = sum(len(keys) for *_, keys in out)
    if found != len(items):
        raise ValueError(
            f"{job.shards_dir}: {len(items) - found} chosen items are in no gallery shard "
            "(were the shards rebuilt for another scenario?)"
        )
    return out


def apply_backfill(run_dir, model: int | None, fraction: float | None, policy: str = "random",
                   ray_address: str | None = None, log=print,
                   transform: bool = False) -> dict:  # fmt: skip
    """``distcl backfill RUN --apply``: see the module docstring. ``model`` is 1-indexed (as
    the CLI and the reports name models). ``transform``: ``apply_transform`` instead."""
    rd = RunDir(run_dir).require("scenario_json")
    _check(rd, model, fraction, policy, transform)
    model -= 1
    job = rd.load_job()
    plans = _plans(rd)
    open_plans = [(n, p) for n, p in plans if not p["done"]]
    if open_plans:
        n, plan = open_plans[0]
        kind = plan.get("kind", "embed")
        asked = ("transform", model) if transform else ("embed", model, policy, fraction)
        found = (kind, plan["model"])
        if kind == "embed":
            found += (plan["policy"], plan["fraction"])
        if asked != found:
            what = (f"{plan['policy']}, fraction {plan['fraction']}" if kind == "embed"
                    else "--transform")  # fmt: skip
            raise ValueError(
                f"{rd.root}/backfill/apply-{n}.json: an unfinished re-index (model "
                f"{plan['model'] + 1}, {what}); run that command again to finish it first"
            )
        if transform:
            return _apply_transform(rd, n, plan, ray_address, log)
        log(f"resuming the re-index apply-{n} ({len(plan['items'])} items)")
    elif transform:
        n = plans[-1][0] + 1 if plans else 1
        return _apply_transform(rd, n, _transform_plan(rd, model), ray_address, log)
    else:
        n = plans[-1][0] + 1 if plans else 1
        plan = choose(rd.root, model, fraction, policy, job.seed)
        atomic_write_json(rd.root / "backfill" / f"apply-{n}.json", plan, indent=1)
        log(f"re-index apply-{n}: model {model + 1} re-embeds {len(plan['items'])} of "
            f"{plan['gallery_items']} gallery items ({policy}, first {plan['first']}, "
            f"{plan['already']} already of model {model + 1} or later)")  # fmt: skip
    t0 = time.perf_counter()
    work = _shards_of(rd, job, set(plan["items"]))
    done_parts = {e.name for e in storage.listdir(rd.gallery / f"model={model}")}
    todo = [(k, shard, keys) for k, shard, keys in work
            if f"backfill-{n}-{k}.parquet" not in done_parts]  # fmt: skip
    if len(todo) < len(work):
        log(f"{len(work) - len(todo)} of {len(work)} parts already written")
    root = str(rd.root.resolve()) if hasattr(rd.root, "resolve") else str(rd.root)
    written = _run_parts(root, n, todo, ray_address)
    plan["done"] = True
    plan["seconds"] = time.perf_counter() - t0
    atomic_write_json(rd.root / "backfill" / f"apply-{n}.json", plan, indent=1)
    log(f"re-index apply-{n} done: {written} rows written in {plan['seconds']:.1f}s "
        f"(gallery/model={model}/backfill-{n}-*.parquet); `distcl eval` reads them")  # fmt: skip
    return plan


def _run_parts(root: str, n: int, todo: list, ray_address: str | None) -> int:
    args = [(root, n, k, shard, keys) for k, shard, keys in todo]
    return _run_tasks(_embed_shard, args, ray_address, gpu=True)


def _run_tasks(fn, args: list[tuple], ray_address: str | None, gpu: bool) -> int:
    """``fn(*a)`` for each ``a`` of ``args``: Ray tasks in a Ray driver (a GPU each where the
    cluster has GPUs and ``gpu``), in this process otherwise; the sum of what they return."""
    from distcl.eval.distributed import ray_driver

    if ray_address is not None:
        from distcl.localray import init_ray

        init_ray(ray_address or None)
    if not ray_driver():
        written = 0
        for a in args:
            written += fn(*a)
            faults.pause_point(os.environ.get(faults.PAUSE_ENV), "reindex", a[2])
        return written
    import ray

    gpus = 1 if gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(fn)
    return sum(ray.get([task.remote(*a) for a in args]))


# -- --apply --transform: old rows through h, no image read ----------------------------------
def _transform_plan(rd: RunDir, model: int) -> dict:
    """The parts to transform: every stored gallery part of a model older than ``model``."""
    from distcl.gallery.store import open_store

    gallery = open_store(rd.gallery)
    parts = [storage.relative(path, rd.gallery) for path, info in gallery.parts
             if info.model < model]  # fmt: skip
    return {"kind": "transform", "model": model, "parts": parts,
            "last_task": rd.finished_tasks() - 1, "done": False}  # fmt: skip


def _transform_part(run_dir: str, plan_n: int, k: int) -> int:
    """Part k of a transform plan: its current rows (those the stale gallery reads) of
    models older than the plan's, sent through h into the plan's model's space and written as
    ``gallery/model=<T>/transform-<n>-<k>.parquet`` (a Ray task, or in-process)."""
    from distcl.eval.distributed import _engine
    from distcl.eval.engine import EvalSettings
    from distcl.eval.transforms import chain, load_transforms
    from distcl.gallery.store import batch_embeddings, open_store, sub_store, write_embeddings

    rd = RunDir(run_dir)
    plan = storage.read_json(rd.root / "backfill" / f"apply-{plan_n}.json")
    model, last = plan["model"], plan["last_task"]
    job = rd.load_job()
    settings = EvalSettings.from_job(job, use_gpu=False)
    key = f"{run_dir}/transform-{plan_n}"  # one engine per worker and plan
    engine = _engine(run_dir, settings, rd.load_scenario(), key)
    ranks = engine.stale_ranks(last)
    gallery = open_store(rd.gallery)
    path = str(storage.join(rd.gallery, plan["parts"][k]))
    hs = load_transforms(rd.root)
    ids, labels, tasks, rows = [], [], [], []
    cols = ("item_id", "label", "task", "model", "embedding")
    for _p, _codes, rb in current_rows(engine, sub_store(gallery, (path,)), ranks, cols):
        m = rb["model"].to_numpy()
        for src in np.unique(m[m < model]):
            sel = pa.array(m == src)
            part = rb.filter(sel)
            ids.append(part["item_id"].to_numpy(zero_copy_only=False))
            labels.append(part["label"].to_numpy())
            tasks.append(part["task"].to_numpy())
            rows.append(chain(hs, int(src), model)(batch_embeddings(part)))
    if not ids:
        return 0
    write_embeddings(rd.gallery, model, f"transform-{plan_n}-{k}", np.concatenate(ids),
                     np.concatenate(labels), np.concatenate(tasks),
                     np.concatenate(rows))  # fmt: skip
    return sum(len(i) for i in ids)


def _apply_transform(rd: RunDir, n: int, plan: dict, ray_address, log) -> dict:
    """Write (or finish) transform plan n: one task per part, parts already written skipped,
    the plan marked done last."""
    path = rd.root / "backfill" / f"apply-{n}.json"
    if not storage.is_file(path):
        atomic_write_json(path, plan, indent=1)
        log(f"re-index apply-{n}: h maps the stored rows of {len(plan['parts'])} gallery parts "
            f"into model {plan['model'] + 1}'s space (no image read)")  # fmt: skip
    model = plan["model"]
    t0 = time.perf_counter()
    done_parts = {e.name for e in storage.listdir(rd.gallery / f"model={model}")}
    todo = [k for k in range(len(plan["parts"]))
            if f"transform-{n}-{k}.parquet" not in done_parts]  # fmt: skip
    if len(todo) < len(plan["parts"]):
        log(f"{len(plan['parts']) - len(todo)} of {len(plan['parts'])} parts already written")
    root = str(rd.root.resolve()) if hasattr(rd.root, "resolve") else str(rd.root)
    written = _run_tasks(_transform_part, [(root, n, k) for k in todo], ray_address, gpu=False)
    plan["done"] = True
    plan["rows"] = written
    plan["seconds"] = time.perf_counter() - t0
    atomic_write_json(path, plan, indent=1)
    log(f"re-index apply-{n} done: {written} rows transformed in {plan['seconds']:.1f}s "
        f"(gallery/model={model}/transform-{n}-*.parquet); `distcl eval` reads them")  # fmt: skip
    return plan

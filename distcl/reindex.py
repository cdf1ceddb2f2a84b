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

from distcl import faults, storage
from distcl.eval import backfill as bf
from distcl.rundir import RunDir, atomic_write_json

POLICIES = ("random", "oldest", "distance", "class_mean")


def _plans(rd: RunDir) -> list[tuple[int, dict]]:
    folder = rd.root / "backfill"
    out = []
    for e in storage.listdir(folder):
        if e.name.startswith("apply-") and e.name.endswith(".json"):
            out.append((int(e.name[6:-5]), storage.read_json(folder / e.name)))
    return sorted(out, key=lambda p: p[0])


def _check(rd: RunDir, model: int | None, fraction: float | None, policy: str) -> int:
    """Arguments checked before any work (each error names its field); returns T."""
    T = rd.finished_tasks()
    if model is None:
        raise ValueError("--model: give the model (1-indexed task) that re-embeds")
    if not 1 <= model <= T:
        raise ValueError(f"--model {model}: the run has finished models 1 .. {T}")
    if fraction is None or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--fraction: a share of the gallery in [0, 1], got {fraction}")
    if policy not in POLICIES:
        raise ValueError(f"--policy: {policy!r} cannot choose the items to re-embed (one of "
                         f"{', '.join(POLICIES)}; uncertainty needs method fct)")  # fmt: skip
    if not storage.exists(rd.gallery):
        raise ValueError(f"{rd.root}: no stored gallery rows (gallery/) to re-index")
    return T


def choose(run_dir, model: int, fraction: float, policy: str, seed: int) -> dict:
    """The plan of a re-index (0-indexed ``model``): the items to re-embed, from the gallery
    as stored after the run's last finished task."""
    from distcl.eval.engine import Engine, EvalSettings
    from distcl.gallery.store import batch_embeddings, iter_batches, open_store

    rd = RunDir(run_dir)
    job, scenario = rd.load_job(), rd.load_scenario()
    last = rd.finished_tasks() - 1
    engine = Engine(rd.root, EvalSettings.from_job(job, use_gpu=False), scenario)
    current = engine._stale_models(last)  # (N,) the model of each item's stored row
    members = np.flatnonzero((engine.cat.tasks >= 0) & (engine.cat.tasks <= last))
    n = len(members)
    if policy == "random":
        order = bf.order_random(n, seed)
    elif policy == "oldest":
        order = bf.order_oldest(current[members], engine.cat.tasks[members], seed)
    else:  # keys from the stored rows: the gallery held once (n x d), never per step
        slot = np.full(len(engine.cat), -1, np.int64)
        slot[members] = np.arange(n)
        rows = np.zeros((n, engine.dim), np.float32)
        gallery = open_store(rd.gallery)
        for rb in iter_batches(gallery, columns=("item_id", "model", "embedding")):
            codes = engine.cat.codes(rb["item_id"], str(gallery.root))
            keep = (rb["model"].to_numpy() == current[codes]) & (slot[codes] >= 0)
            rows[slot[codes[keep]]] = batch_embeddings(rb)[keep]
        if policy == "class_mean":
            keys = bf.class_mean_keys(rows, engine.cat.labels[members])
        else:  # distance to model T's row of the item (the run's evaluation embeddings)
            keys = np.zeros(n)
            for rb in iter_batches(engine.eval_store, model, columns=("item_id", "embedding")):
                codes = engine.cat.codes(rb["item_id"], str(engine.eval_store.root))
                keep = slot[codes] >= 0
                at = slot[codes[keep]]
                keys[at] = bf.distance_keys(rows[at], batch_embeddings(rb)[keep])
        order = bf._stable_desc(keys, seed)
    first = members[order[: int(fraction * n)]]  # the policy's first share of the gallery
    chosen = first[current[first] < model]  # rows already of model T (or later) stay
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
    from distcl.train.endtask import embed_batch
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
                   ray_address: str | None = None, log=print) -> dict:  # fmt: skip
    """``distcl backfill RUN --apply``: see the module docstring. ``model`` is 1-indexed (as
    the CLI and the reports name models)."""
    rd = RunDir(run_dir).require("scenario_json")
    _check(rd, model, fraction, policy)
    model -= 1
    job = rd.load_job()
    plans = _plans(rd)
    open_plans = [(n, p) for n, p in plans if not p["done"]]
    if open_plans:
        n, plan = open_plans[0]
        asked = (plan["model"], plan["policy"], plan["fraction"])
        if asked != (model, policy, fraction):
            raise ValueError(
                f"{rd.root}/backfill/apply-{n}.json: an unfinished re-index (model "
                f"{plan['model'] + 1}, {plan['policy']}, fraction {plan['fraction']}); run that "
                "command again to finish it first"
            )
        log(f"resuming the re-index apply-{n} ({len(plan['items'])} items)")
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
    from distcl.eval.distributed import ray_driver

    if ray_address is not None:
        from distcl.localray import init_ray

        init_ray(ray_address or None)
    if not ray_driver():
        written = 0
        for k, shard, keys in todo:
            written += _embed_shard(root, n, k, shard, keys)
            faults.pause_point(os.environ.get(faults.PAUSE_ENV), "reindex", k)
        return written
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_embed_shard)
    return sum(ray.get([task.remote(root, n, k, shard, keys) for k, shard, keys in todo]))

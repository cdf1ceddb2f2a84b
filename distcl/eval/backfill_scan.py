"""Backfilling curves of a run, streamed from its stored Parquet rows (docs/backfill.md).

    distcl backfill runs/quickstart                       # the last model against each older one
    distcl backfill RUN --pairs all --policy random --policy distance --steps 20

For a pair (old model j, new model i) and a protocol, the gallery is the protocol's
(``closed``: the closed-set items, leave-one-out; ``open``: the held-out classes' gallery items
against their probes), the queries are embedded by model i, and the gallery starts as model
j's rows (``eval/embeddings/model=<j>``); each policy orders the gallery's items and the curve
(``distcl.eval.backfill``) follows them being replaced by model i's rows.

How it streams: a policy's order becomes a bucket per item (the step at which it turns new).
Then two passes per (pair, protocol): model i's rows, then model j's rows, each cut into the
engine's gallery shards (``Engine.shards``); a shard's scan reads its rows in record batches,
sorts each batch by bucket, scores it against the queries (one matmul per policy) and keeps
per query and bucket the best positive and negative (and the 100 best, for mAP@100) in a
:class:`~distcl.eval.backfill.BackfillAccumulator`; the shards' accumulators merge by maxima.
Memory: the queries, one batch's scores (sized to the evaluation's memory budget) and
Q x (K + 2) per policy; never a gallery per step. The policies' keys take a pass of their own
(``distance``: model j's rows held, model i's streamed; ``class_mean``: two passes over j's).
In a Ray driver the scans are Ray tasks (one per shard, as the evaluation's); elsewhere they
run here.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distcl import storage
from distcl.eval import backfill as bf
from distcl.eval.backfill_report import summary_markdown, write_curves
from distcl.eval.engine import Engine, EvalSettings
from distcl.eval.transforms import chain
from distcl.gallery.store import batch_embeddings, iter_batches, sub_store
from distcl.rundir import RunDir

PROTOCOLS = ("closed", "open")


@dataclass(frozen=True)
class BackfillTarget:
    """What one curve backfills: the protocol's gallery items and its queries."""

    protocol: str
    members: np.ndarray  # (N,) bool over canonical positions: the gallery's items
    queries: np.ndarray  # (Q,) canonical positions of the queries
    query_set: str  # the engine's query set: "closed" or "probes"
    leave_one_out: bool


def targets(engine: Engine, protocols: list[str]) -> list[BackfillTarget]:
    plan = engine.plan
    out = []
    for proto in protocols:
        if proto == "closed":
            codes = np.flatnonzero(plan.closed)
            out.append(BackfillTarget("closed", plan.closed, codes, "closed", True))
        elif proto == "open":
            if plan.split is None or not plan.heldout:
                raise ValueError(
                    "--protocol open: the run has no held-out classes' split "
                    "(scenario.heldout_classes and eval.protocols: [open])"
                )
            out.append(BackfillTarget("open", plan.split.gallery, np.flatnonzero(plan.split.probes),
                              "probes", False))  # fmt: skip
        else:
            raise ValueError(f"--protocol: {proto!r} has no backfilling curve "
                             f"(one of {', '.join(PROTOCOLS)})")  # fmt: skip
    return out


def _rows(engine: Engine, model: int, target: BackfillTarget, paths=None):
    """(codes (B,), embeddings (B, d)) of model ``model``'s rows of the target's gallery, in
    record batches (``paths``: a shard of the store)."""
    store = engine.eval_store if paths is None else sub_store(engine.eval_store, paths)
    where = f"{engine.eval_store.root}/model={model}"
    cols = ("item_id", "embedding")
    for rb in iter_batches(store, model, columns=cols, batch_rows=engine._batch_rows):
        codes = engine.cat.codes(rb["item_id"], where)
        keep = np.flatnonzero(target.members[codes])
        if len(keep):
            yield codes[keep], batch_embeddings(rb)[keep]


def old_side_maps(engine: Engine, old: int, new: int, transformed: bool) -> tuple:
    """(map of model ``new``'s rows, map of model ``old``'s rows, the size they meet in) for
    the old side of a curve: as ``distcl.eval.spaces`` says, or, ``transformed``, the old rows
    sent through h_old+1 .. h_new into model new's space (method fct)."""
    if transformed:
        return None, chain(engine.transforms, old, new), engine.dims[new]
    return engine.spaces.maps(new, old)


def policy_buckets(engine: Engine, target: BackfillTarget, old: int, new: int, policies: list[str],
                   cuts: np.ndarray, seed: int,
                   transformed: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Per policy the step (bucket) at which each gallery item turns new: (N,) int16 over
    canonical positions, -1 outside the gallery. ``transformed``: the old rows are h's
    output (``distance``: ||new - h(old)||, FastFill's oracle; ``uncertainty``: h_new's sigma)."""
    members = np.flatnonzero(target.members)  # (n,) canonical positions, sorted
    n = len(members)
    keys: dict[str, np.ndarray] = {}
    slot = np.full(len(engine.cat), -1, np.int64)
    slot[members] = np.arange(n)
    if "distance" in policies or "class_mean" in policies:
        qmap, gmap, dim = old_side_maps(engine, old, new, transformed)  # where the two meet
        old_rows = np.zeros((n, dim), np.float32)  # (n, d): model j's gallery, once
        for codes, emb in _rows(engine, old, target):
            old_rows[slot[codes]] = emb if gmap is None else gmap(emb)
        if "class_mean" in policies:
            keys["class_mean"] = bf.class_mean_keys(old_rows, engine.cat.labels[members])
        if "distance" in policies:
            dist = np.zeros(n)
            for codes, emb in _rows(engine, new, target):
                mapped = emb if qmap is None else qmap(emb)
                dist[slot[codes]] = bf.distance_keys(old_rows[slot[codes]], mapped)
            keys["distance"] = dist
        del old_rows
    if "uncertainty" in policies:  # FastFill: the last h's predicted log sigma^2 of each row
        before = None if new - 1 == old else chain(engine.transforms, old, new - 1)
        sigma = np.zeros(n)
        for codes, emb in _rows(engine, old, target):
            sigma[slot[codes]] = engine.transforms[new].log_var(emb if before is None
                                                               else before(emb))  # fmt: skip
        keys["uncertainty"] = sigma
    out = {}
    for p in policies:
        if p == "random":
            order = bf.order_random(n, seed)
        elif p == "oldest":  # every row is model j's: the items that arrived first
            order = bf.order_oldest(np.full(n, old), engine.cat.tasks[members], seed)
        elif p in keys:
            order = bf._stable_desc(keys[p], seed)
        else:  # check_policies let it through: a bug
            raise AssertionError(f"policy {p} has no keys")
        position = np.empty(n, np.int64)
        position[order] = np.arange(n)
        buckets = np.full(len(engine.cat), -1, np.int16)
        buckets[members] = bf.first_new_step(position, cuts)
        out[p] = buckets
    return out


def scan(
    engine: Engine, target: BackfillTarget, side: str, model: int, queries: np.ndarray,
    buckets: dict[str, np.ndarray], cuts: np.ndarray, map_k: int | None, paths=None,
    query_model: int | None = None, transformed: bool = False,
) -> dict[str, bf.BackfillAccumulator]:  # fmt: skip
    """One pass over model ``model``'s rows (``side``: their role, "new" or "old") of the
    target's gallery (a shard of it: ``paths``), feeding one accumulator per policy.
    ``queries``: model ``query_model``'s (default ``model``'s), brought to ``model``'s space
    here when the sizes differ (``distcl.eval.spaces``); ``transformed``: an old side's rows
    go through h into the query model's space instead (method fct)."""
    qm = model if query_model is None else query_model
    qmap, gmap, _ = (old_side_maps(engine, model, qm, True) if transformed and side == "old"
                     else engine.spaces.maps(qm, model))  # fmt: skip
    if qmap is not None:
        queries = qmap(queries)
    lab = engine.cat.labels
    q_codes = target.queries
    q_self = q_codes if target.leave_one_out else np.full(len(q_codes), -1)
    n_pos = _n_pos(engine, target)
    accs = {p: bf.BackfillAccumulator(lab[q_codes], q_self, cuts, n_pos, map_k) for p in buckets}
    # Scores of a batch: Q x R float32, kept within a quarter of the evaluation's budget.
    per = max(256, engine.s.budget // (16 * max(len(q_codes), 1)))
    for codes, emb in _rows(engine, model, target, paths):
        if gmap is not None:
            emb = gmap(emb)
        for start in range(0, len(codes), per):
            c, e = codes[start : start + per], emb[start : start + per]
            for p, b in buckets.items():
                order = np.argsort(b[c], kind="stable")  # rows by bucket: no score copy
                accs[p].add(side, queries @ e[order].T, lab[c[order]], c[order], b[c[order]])
    return accs


def _n_pos(engine: Engine, target: BackfillTarget) -> np.ndarray:
    """(Q,) positives of each query in the target's gallery (its own item excluded)."""
    counts = np.bincount(engine.cat.labels[target.members], minlength=engine.cat.labels.max() + 1)
    n = counts[engine.cat.labels[target.queries]]
    return n - (target.leave_one_out & target.members[target.queries])


# ------------------------------------------------------------------ one curve set
def pairs_of(spec: str, T: int) -> list[tuple[int, int]]:
    """(old, new) model pairs, 0-indexed, of ``last`` (every older model against the last
    one), ``all`` (every pair j < i) or ``J,I`` (1-indexed, as reports name models)."""
    if spec == "last":
        return [(j, T - 1) for j in range(T - 1)]
    if spec == "all":
        return [(j, i) for i in range(T) for j in range(i)]
    try:
        j, i = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--pairs: {spec!r} is not last, all or J,I") from None
    if not 1 <= j < i <= T:
        raise ValueError(f"--pairs {spec}: needs 1 <= J < I <= {T} (the run's finished models)")
    return [(j - 1, i - 1)]


def run_curves(run_dir, pairs: str = "last", policies=("random", "oldest", "distance",
               "class_mean"), steps: int = 20, protocols=None, map_k: int | None = bf.MAP_K,
               seed: int | None = None, log=print,
               transform: bool = False) -> list[dict]:  # fmt: skip
    """Every curve of a finished (or partly finished) run; see the module docstring.
    ``transform``: also the curves whose old rows are h's output (method fct: FCT's and
    FastFill's backfilling), marked ``"old_rows": "transformed"`` (the others ``"stored"``)."""
    rd = RunDir(run_dir).require("scenario_json")
    job, scenario = rd.load_job(), rd.load_scenario()
    T = rd.finished_tasks()
    if T < 2:
        raise ValueError(f"{rd.root}: {T} finished model(s); a backfilling curve needs two")
    has_sigma = False
    if transform:
        from distcl.eval.transforms import load_transforms

        hs = load_transforms(rd.root)
        if not hs:
            raise ValueError(f"--transform: {rd.root} has no transformation (models/<t>/"
                             "transform.npz): train it with method fct")  # fmt: skip
        has_sigma = all(h.sigma is not None for h in hs.values())
    policies = bf.check_policies(policies, has_sigma=has_sigma)  # uncertainty: --transform
    if steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
    settings = EvalSettings.from_job(job)
    if protocols is None:
        protocols = [p for p in PROTOCOLS if p in settings.protocols]
    seed = job.seed if seed is None else seed
    engine = Engine(rd.root, settings, scenario)
    variants = [(False, [p for p in policies if p != "uncertainty"])]
    if transform:
        variants.append((True, list(policies)))
    out = []
    for target in targets(engine, list(protocols)):
        n = int(target.members.sum())
        cuts = bf.step_cuts(n, steps)
        for old, new in pairs_of(pairs, T):
            for transformed, pols in variants:
                if not pols:
                    continue
                t0 = time.perf_counter()
                buckets = policy_buckets(engine, target, old, new, pols, cuts, seed, transformed)
                queries = engine._query_data(new)[target.query_set]  # (Q, d) by the new model
                accs = _passes(engine, target, old, new, queries, buckets, cuts, map_k,
                               transformed)  # fmt: skip
                rows = "transformed" if transformed else "stored"
                for p, acc in accs.items():
                    res = acc.result()
                    curve = bf.curve_dict(cuts, n, res["values"], res.get(f"map@{map_k}"), map_k)
                    out.append({"old": old, "new": new, "protocol": target.protocol,
                                "policy": p, "old_rows": rows, "queries": res["queries"],
                                **curve})  # fmt: skip
                if log:
                    aucs = ", ".join(f"{c['policy']} {c['auc']:.3f}" for c in out[-len(accs) :])
                    log(f"backfill {target.protocol} {old + 1}->{new + 1} ({rows} old rows): "
                        f"AUC {aucs} ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
                engine.release()
    return out


def _passes(engine, target, old, new, queries, buckets, cuts, map_k, transformed=False):
    """The two passes (model ``new``'s rows, model ``old``'s), shard by shard; as Ray tasks
    in a Ray driver (``distcl.eval.distributed``), in this process otherwise."""
    from distcl.eval.distributed import ray_driver

    shards = {side: _shards(engine, m) for side, m in (("new", new), ("old", old))}
    if ray_driver():
        return _ray_passes(engine, target, old, new, queries, buckets, cuts, map_k, shards,
                           transformed)  # fmt: skip
    total = None
    for side, model in (("new", new), ("old", old)):
        for paths in shards[side]:
            part = scan(engine, target, side, model, queries, buckets, cuts, map_k, paths, new,
                        transformed)  # fmt: skip
            total = part if total is None else {p: total[p].merge(part[p]) for p in total}
    return total


def _shards(engine: Engine, model: int) -> list[tuple[str, ...]]:
    """Runs of model ``model``'s Parquet parts of at most ``shard_rows`` rows."""
    groups: list[list[str]] = []
    size = 0
    for path, info in engine.eval_store.parts:
        if info.model != model:
            continue
        if groups and size + info.rows <= engine.shard_rows:
            groups[-1].append(path)
            size += info.rows
        else:
            groups.append([path])
            size = info.rows
    return [tuple(g) for g in groups]


def _scan_task(run_dir, settings, scenario, key, target, side, model, queries, buckets, cuts,
               map_k, paths, query_model, transformed):  # fmt: skip
    from distcl.eval.distributed import _engine_for_task

    with _engine_for_task(run_dir, settings, scenario, key) as engine:
        return scan(engine, target, side, model, queries, buckets, cuts, map_k, paths,
                    query_model, transformed)  # fmt: skip


def _ray_passes(engine, target, old, new, queries, buckets, cuts, map_k, shards, transformed):
    import ray

    from distcl.eval.distributed import _options
    from distcl.placement import worker_nodes

    options = _options(worker_nodes(ray.nodes(), False), False)
    task = ray.remote(_scan_task)
    loc = engine.run_dir
    root = str(loc.resolve()) if isinstance(loc, Path) else str(loc)
    settings = dataclasses.replace(engine.s, use_gpu=False)
    common = (root, settings, ray.put(engine.scenario), uuid.uuid4().hex, target)
    q_ref, b_ref = ray.put(queries), ray.put(buckets)
    refs = [
        task.options(**next(options)[1]).remote(
            *common, side, m, q_ref, b_ref, cuts, map_k, paths, new, transformed
        )  # fmt: skip
        for side, m in (("new", new), ("old", old))
        for paths in shards[side]
    ]
    total = None
    for ref in refs:  # merged in shard order, as in one process
        part = ray.get(ref)
        total = part if total is None else {p: total[p].merge(part[p]) for p in total}
    return total


def backfill_run(run_dir, log=print, **kw) -> list[dict]:
    """``distcl backfill RUN``: the curves, their files, and the report re-rendered with
    them (when the run has been evaluated)."""
    curves = run_curves(run_dir, log=log, **kw)
    write_curves(run_dir, curves)
    rd = RunDir(run_dir)
    if storage.is_file(rd.metrics_json):  # the report shows the curves' table
        from distcl.eval.report import write_report

        write_report(rd.root, storage.read_json(rd.metrics_json))
    log(summary_markdown(curves))
    return curves

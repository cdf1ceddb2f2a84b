"""Evaluation rows as Ray tasks: the driver coordinates, the search runs on the workers
(docs/design.md; what is computed: ``distcl.eval.engine``, docs/metrics.md).

    rows = compute_rows(run_dir, settings, scenario, [3])  # Ray tasks in a Ray driver, else here

``compute_rows`` runs the engine as Ray tasks when this process is a Ray driver (``distcl run``,
``distcl eval --ray``), and in this process otherwise (tests, a laptop, and inside a Ray worker,
e.g. a tuning trial scoring its own rows, which already runs off the head node).

The work is the engine's own, cut where it is small to pass on:

- a *plan* task reads the evaluation set's ids, labels and tasks (no embeddings) and returns
  the empty rows and the cells (``Engine.cells``: gallery model j x a group of query models
  i >= j, then the stale gallery after each task), each with its gallery shards
  (``Engine.shards``: runs of Parquet parts of at most ``eval`` ``shard_rows`` rows);
- per shard a *scan* task (``Engine.scan``): it streams its parts once for every query model of
  the cell and returns top-k lists (Q x k per query set), the canonical positions of its rows
  and the identification template sums (additive over shards);
- per cell a *finish* task (``Engine.finish``): Ray hands it the scans' results (object refs
  resolved on its node, not through the driver); it merges the top-k lists shard by shard with
  ``faiss.ResultHeap`` and returns the metric entries of the rows, a few floats each.

A target ranked in full (exact mAP, ``Engine.exact``) or searched with an IVF (-PQ) index is
one shard: merging full rankings, or IVF indexes trained on the whole gallery, is not done.

The driver holds the settings, the scenario, object refs and the metric entries; never an
array that grows with the number of images. Numbers equal the in-process engine's exactly:
shards depend on the store and the settings only, every task runs the engine's code on them,
and the merge runs in the same shard order in both.

Placement (``worker_nodes``): when the cluster has nodes other than the head with CPUs (GPUs
when ``use_gpu`` and the cluster has GPUs; then each scan task takes ``num_gpus=1`` and faiss
searches on it), tasks are given to those nodes in turn with a *soft*
``NodeAffinitySchedulingStrategy``: a task waits for its node's resources, and runs elsewhere
(possibly the head) only if that node dies or cannot ever fit it. Round-robin spreads the
shards of a gallery over the nodes; no cluster configuration (custom resources, labels) is
needed. A one-node Ray (the head is all there is) schedules tasks as usual. Every task takes
1 CPU: Ray then gives it OMP_NUM_THREADS=1, so faiss uses one core per task and parallelism
comes from the shards and cells. A worker keeps one engine per evaluation (the catalogue read
once, not per task); query sets are read per task and dropped after it.

Test: ``.venv/bin/python -m pytest tests/test_eval_distributed.py -q``
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distcl import storage
from distcl.eval.engine import Cell, Engine, EvalSettings, Partial, apply_cell
from distcl.placement import HEAD_RESOURCE, spread_options, worker_nodes  # noqa: F401

_engine_cache: tuple[str, Engine] | None = None  # one per worker process, per evaluation


def ray_driver() -> bool:
    """True when Ray is initialised and this process is its driver (not a task or actor)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE


def compute_rows(
    run_dir: str | Path,
    settings: EvalSettings,
    scenario: Any,
    tasks: list[int],
    log=None,
    stale: bool = True,
) -> dict[int, dict]:
    """Rows ``tasks`` of every matrix and their stale-gallery entries (``Engine.rows``): as
    Ray tasks when this process is a Ray driver, in this process otherwise; same numbers."""
    if ray_driver():
        return ray_rows(run_dir, settings, scenario, tasks, log=log, stale=stale)
    return Engine(run_dir, settings, scenario).rows(tasks, log=log, stale=stale)


def _options(nodes: list[str], gpu: bool) -> Iterator[tuple[dict, dict]]:
    """(options of a scan task, options of a plan or finish task), round-robin over nodes."""
    n = 0
    while True:
        where = spread_options(n, nodes)
        n += 1
        yield {"num_cpus": 1, "num_gpus": 1 if gpu else 0, **where}, {"num_cpus": 1, **where}


def _engine(run_dir: str, settings: EvalSettings, scenario: Any, key: str) -> Engine:
    """This worker's engine for evaluation ``key`` (its catalogue serves every task of that
    evaluation that lands here); faiss-gpu only where this task has a GPU."""
    from distcl.gallery.index import gpu_available

    global _engine_cache
    use_gpu = settings.use_gpu and gpu_available()  # this task's GPUs (Ray reuses workers)
    key = f"{key}/{'gpu' if use_gpu else 'cpu'}"
    if _engine_cache is None or _engine_cache[0] != key:
        settings = dataclasses.replace(settings, use_gpu=use_gpu)
        _engine_cache = None  # free the previous evaluation's engine first
        _engine_cache = (key, Engine(run_dir, settings, scenario))
    return _engine_cache[1]


@contextlib.contextmanager
def _engine_for_task(run_dir: str, settings: EvalSettings, scenario: Any, key: str):
    """The worker's engine for one task; its query sets are dropped after the task, so an idle
    worker holds the catalogue only (ids, labels, tasks), not up to half the budget."""
    engine = _engine(run_dir, settings, scenario, key)
    try:
        yield engine
    finally:
        engine.release()


def _plan(run_dir: str, settings: EvalSettings, scenario: Any, key: str, tasks: list[int],
          stale: bool) -> tuple[dict, list[tuple[Cell, list[tuple[str, ...]]]]]:  # fmt: skip
    with _engine_for_task(run_dir, settings, scenario, key) as engine:
        rows, cells = engine.cells(tasks, stale)
        return rows, [(cell, engine.shards(cell)) for cell in cells]


def _scan(run_dir: str, settings: EvalSettings, scenario: Any, key: str, cell: Cell,
          paths: tuple[str, ...]) -> Partial:  # fmt: skip
    with _engine_for_task(run_dir, settings, scenario, key) as engine:
        return engine.scan(cell, paths)


def _finish(run_dir: str, settings: EvalSettings, scenario: Any, key: str, cell: Cell,
            *partials: Partial) -> dict:  # fmt: skip
    with _engine_for_task(run_dir, settings, scenario, key) as engine:
        return engine.finish(cell, list(partials))


def ray_rows(
    run_dir: str | Path,
    settings: EvalSettings,
    scenario: Any,
    tasks: list[int],
    log=None,
    stale: bool = True,
) -> dict[int, dict]:
    """``Engine.rows`` as Ray tasks (see the module docstring); needs ``ray.init`` first."""
    import ray

    t0 = time.perf_counter()
    # Scan tasks take a GPU each when the cluster has GPUs and eval.use_gpu allows; each task
    # then resolves "auto" where it runs (faiss-gpu there, or a CPU search).
    gpus = ray.cluster_resources().get("GPU", 0)
    if settings.use_gpu is True and not gpus:
        raise ValueError("eval.use_gpu is yes, but the Ray cluster has no GPU")
    gpu = settings.use_gpu is not False and gpus > 0
    options = _options(worker_nodes(ray.nodes(), gpu), gpu)
    plan, scan, finish = (ray.remote(f) for f in (_plan, _scan, _finish))
    loc = storage.location(run_dir)  # a local path (absolute: workers run elsewhere) or a URI
    root = str(loc.resolve()) if isinstance(loc, Path) else str(loc)
    args = (root, settings, ray.put(scenario), uuid.uuid4().hex)
    rows, cells = ray.get(plan.options(**next(options)[1]).remote(*args, list(tasks), stale))
    pending: dict[Any, int] = {}
    for n, (cell, shards) in enumerate(cells):
        parts = [scan.options(**next(options)[0]).remote(*args, cell, p) for p in shards]
        pending[finish.options(**next(options)[1]).remote(*args, cell, *parts)] = n
    results: list[dict | None] = [None] * len(cells)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        n = pending.pop(ready[0])
        results[n] = ray.get(ready[0])  # metric entries only: a few floats per row
        if log:
            cell = cells[n][0]
            log(f"{cell.kind} model {cell.model}: rows {list(cell.queries) or [cell.model]} "
                f"({len(cells[n][1])} shards) done at {time.perf_counter() - t0:.1f}s")  # fmt: skip
    for result in results:  # in cell order: each row's entries by ascending gallery model
        apply_cell(rows, result)
    return rows

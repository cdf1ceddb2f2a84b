"""Evaluation rows as Ray tasks (``distcl.eval.distributed``) against the in-process engine:
equal exactly for every protocol, on the exact and the top-k paths, with galleries split into
several shards per model; what the driver receives does not grow with the number of items;
placement avoids the head node; the shard merge equals one streamed search.

Run: ``.venv/bin/python -m pytest tests/test_eval_distributed.py -q`` (Ray tests: marker ``ray``)
"""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import ray
from test_eval_engine import ALL, T, make_run

from distcl.eval import distributed as dist
from distcl.eval.engine import Engine, EvalSettings
from distcl.eval.evaluate import evaluate_run

EVAL = {"protocols": list(ALL), "verification_pairs": 40, "folds": 4, "distractor_classes": 1,
        "fars": [0.05, 0.2]}  # fmt: skip


def _run(make_job, root, per_class=8):
    job = make_job(root, name="dist", data={"synthetic_classes": 10}, eval=EVAL,
                   scenario={"tasks": T, "heldout_classes": 3})  # fmt: skip
    return (job, *make_run(job, per_class=per_class, parts=4))


@pytest.fixture(scope="module")
def openrun(make_job, tmp_path_factory):
    return _run(make_job, tmp_path_factory.mktemp("dist"))


def _settings(job, **kw) -> EvalSettings:
    return dataclasses.replace(EvalSettings.from_job(job, use_gpu=False), **kw)


def _strip(rows: dict) -> dict:
    """Rows without wall times (the only field that may differ)."""
    for row in rows.values():
        if row["stale"] is not None:
            row["stale"] = {k: v for k, v in row["stale"].items() if k != "seconds"}
    return rows


@pytest.mark.ray
@pytest.mark.parametrize(
    "kw", [{}, {"exact_map": False, "shard_rows": 20, "block_rows": 7}], ids=["exact", "sharded"]
)
def test_ray_tasks_equal_the_in_process_engine(shared_ray, openrun, kw):
    job, run, scen, *_ = openrun
    s = _settings(job, **kw)
    engine = Engine(run, s, scen)
    rows, cells = engine.cells(list(range(T)))
    n_shards = [len(engine.shards(c)) for c in cells]
    if kw:  # 4 parts of 25 rows per model: each its own shard; stale parts are smaller
        assert [c.kind for c in cells] == ["gallery"] * T + ["stale"] * T
        assert n_shards[:T] == [4] * T and min(n_shards[T:]) >= 2, n_shards
    else:  # exact rankings keep a gallery whole
        assert n_shards == [1] * len(cells)
    here = _strip(engine.rows(list(range(T))))
    assert set(here[T - 1]["protocols"]) == {"all", "seen", "open", "verification",
                                             "identification"}  # fmt: skip
    assert _strip(dist.ray_rows(run, s, scen, list(range(T)))) == here
    if kw:  # and the shards' merge equals one pass over the unsharded gallery, here
        whole = Engine(run, dataclasses.replace(s, shard_rows=None, block_rows=None), scen)
        assert _strip(whole.rows(list(range(T)))) == here


def _ann_free(rows: dict) -> dict:
    """Rows without the ANN recall entries (what a flat search does not report)."""
    for row in rows.values():
        for entry in [p.get("values", {}) for p in row["protocols"].values()] + [row["stale"]]:
            for key in [k for k in entry or {} if k.startswith("ann_recall")]:
                del entry[key]
    return rows


@pytest.mark.ray
def test_ivf_galleries_are_sharded_and_their_recall_is_computed_at_the_merge(shared_ray, openrun):
    """IVF over 4 shards of 25 rows: each shard trains its own index (1 list here, so each
    shard's search is exhaustive): the merged lists equal sharded flat search exactly, the
    recall from the merged lists against the merged exact ones is 1, and Ray tasks give
    the in-process numbers. One shard (no shard_rows) is the unsharded IVF search."""
    job, run, scen, *_ = openrun
    kw = {"exact_map": False, "shard_rows": 20, "block_rows": 7}
    ivf = Engine(run, _settings(job, index="ivf", **kw), scen)
    rows, cells = ivf.cells(list(range(T)))
    assert [len(ivf.shards(c)) for c in cells][:T] == [4] * T
    here = _strip(ivf.rows(list(range(T))))
    recalls = [r for row in here.values() for p in row["protocols"].values()
               for k, v in p.get("values", {}).items() if k.startswith("ann_recall")
               for r in v if r is not None]  # fmt: skip
    recalls += [v for row in here.values() for k, v in row["stale"].items()
                if k.startswith("ann_recall")]  # fmt: skip
    assert recalls and all(r == 1.0 for r in recalls)
    flat = _strip(Engine(run, _settings(job, **kw), scen).rows(list(range(T))))
    assert json.dumps(_ann_free(json.loads(json.dumps(here))), sort_keys=True) == json.dumps(
        flat, sort_keys=True)  # fmt: skip
    assert _strip(dist.ray_rows(run, _settings(job, index="ivf", **kw), scen,
                                list(range(T)))) == here  # fmt: skip
    one = Engine(run, _settings(job, index="ivf", exact_map=False), scen)
    assert [len(one.shards(c)) for c in one.cells(list(range(T)))[1]] == [1] * (2 * T)


@pytest.mark.ray
def test_eval_use_gpu_yes_on_a_cluster_without_gpus_names_the_field(shared_ray, openrun):
    job, run, scen, *_ = openrun
    assert not ray.cluster_resources().get("GPU")
    with pytest.raises(ValueError, match="eval.use_gpu is yes, but the Ray cluster has no GPU"):
        dist.ray_rows(run, _settings(job, use_gpu=True), scen, [0])
    # auto: scan tasks without a GPU search on CPUs (resolved in each task)
    assert dist.ray_rows(run, _settings(job, use_gpu="auto"), scen, [0])[0]["protocols"]


@pytest.mark.ray
def test_evaluate_run_in_a_ray_driver_searches_in_tasks(shared_ray, openrun, monkeypatch):
    job, run, scen, *_ = openrun
    s = _settings(job, exact_map=False, shard_rows=30)
    assert dist.ray_driver()

    def no_engine_here(*a, **k):
        raise AssertionError("the driver ran the engine itself")

    with monkeypatch.context() as m:
        m.setattr(Engine, "rows", no_engine_here)
        via_ray = evaluate_run(run, log=lambda *a: None, settings=s)
    for path in (run / "eval" / "rows").iterdir():
        path.unlink()  # the row cache
    monkeypatch.setattr(dist, "ray_driver", lambda: False)
    here = evaluate_run(run, log=lambda *a: None, settings=s)
    for result in (via_ray, here):  # wall times differ; NaN (above the diagonal) != NaN
        result["stale_gallery"] = [{k: v for k, v in r.items() if k != "seconds"}
                                   for r in result["stale_gallery"]]  # fmt: skip
    for key in ("protocols", "stale_gallery"):
        assert json.dumps(via_ray[key], sort_keys=True) == json.dumps(here[key], sort_keys=True)


def _walk(obj, sizes: list[int]) -> None:
    """Lengths of every container and array inside ``obj`` (dataclasses included)."""
    if isinstance(obj, np.ndarray):
        sizes.append(obj.size)
        assert obj.size <= 16, f"the driver received an array of {obj.size} values"
    elif isinstance(obj, dict):
        sizes.append(len(obj))
        for v in obj.values():
            _walk(v, sizes)
    elif isinstance(obj, (list, tuple)):
        sizes.append(len(obj))
        for v in obj:
            _walk(v, sizes)
    elif dataclasses.is_dataclass(obj):
        _walk(dataclasses.asdict(obj), sizes)


@pytest.mark.ray
def test_what_the_driver_receives_does_not_grow_with_the_items(
    shared_ray, make_job, tmp_path, monkeypatch
):
    """8x the items per class: the driver receives the same number of bytes (+- 2 %) and no
    array (the scans' partials, which grow with the items, go from task to task). Both runs
    sit in folders of equal name lengths: the planned cells name their Parquet parts."""
    small, big = (_run(make_job, tmp_path / name, n) for name, n in (("a", 8), ("b", 64)))
    real_get = ray.get
    got: list = []

    def get(refs, *a, **k):
        value = real_get(refs, *a, **k)
        got.append(value)
        return value

    monkeypatch.setattr(ray, "get", get)
    received = []
    for job, run, scen, ids, *_ in (small, big):
        got.clear()
        s = _settings(job, exact_map=False)
        rows = dist.ray_rows(run, s, scen, list(range(T)))
        sizes: list[int] = []
        _walk(got, sizes)
        assert max(sizes) < len(ids) / 4, (max(sizes), len(ids))
        received.append(len(pickle.dumps(got)))
        assert rows[T - 1]["items"]["closed"] == len(ids) - 3 * len(ids) // 10
    assert abs(received[1] - received[0]) <= 0.02 * received[0], received


def test_worker_nodes_avoid_the_head():
    head = {"NodeID": "h", "Alive": True, "Resources": {dist.HEAD_RESOURCE: 1.0, "CPU": 8.0}}
    cpu = {"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0}}
    gpu = {"NodeID": "b", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}
    dead = {"NodeID": "c", "Alive": False, "Resources": {"CPU": 4.0}}
    assert dist.worker_nodes([head, cpu, gpu, dead], gpu=False) == ["a", "b"]
    assert dist.worker_nodes([head, cpu, gpu, dead], gpu=True) == ["b"]
    assert dist.worker_nodes([head, dead], gpu=False) == []  # one-node Ray: run on the head


def test_shard_merge_equals_one_streamed_search():
    """Top-k lists of consecutive shards, merged, equal one StreamSearch fed the same blocks,
    ties included (duplicated rows), shards shorter than k included."""
    from distcl.gallery.search import QuerySet, StreamSearch, merge_topk

    rng = np.random.default_rng(0)
    g = rng.normal(size=(60, 8)).astype(np.float32)
    g[30:40] = g[:10]  # exact ties across shards
    q = rng.normal(size=(25, 8)).astype(np.float32)
    lab = np.arange(60) % 5
    blocks = [(0, 13), (13, 30), (30, 33), (33, 60)]  # shard 3 has 3 < k rows
    one = StreamSearch([QuerySet(q, 6)], 8)
    lists = []
    for a, b in blocks:
        one.add(g[a:b], lab[a:b])
        shard = StreamSearch([QuerySet(q, 6)], 8)
        shard.add(g[a:b], lab[a:b])
        lists.append(shard.results()[0])
    scores, rows = merge_topk(lists, [b - a for a, b in blocks])
    want_scores, want_rows = one.results()[0]
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(rows, want_rows)

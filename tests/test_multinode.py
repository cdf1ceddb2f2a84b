"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and two
worker nodes, each its own raylet with its own resources, all on 127.0.0.1): shard building
spreads over the nodes, and the shards are the bytes a single process writes; a training run
puts its Train workers and its memory shards on different nodes, every rank's Parquet part
arrives, and losing a worker node mid-task (removed, another added) ends with the run
finished, each epoch trained once and each item stored once per model.

Run: ``.venv/bin/python -m pytest tests/test_multinode.py -q -s`` (markers ``ray``, ``slow``;
``-s`` prints which node wrote which shard)
"""

from __future__ import annotations

import collections
import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray

from distcl.data.shards import build_shards, load_manifest, plan_shards, write_shards_serial

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from distcl.localray import API_SERVER_ENV, _free_port
    from distcl.raycompat import loopback_only

    if ray.is_initialized():
        ray.shutdown()
    # Ray's single-machine mode keeps every node on 127.0.0.1 (otherwise Ray swaps in the
    # host's routable address: see distcl.localray); set for this process and the nodes.
    # Every process of the cluster asks its own dashboard (Ray Train's placement-group
    # cleaner does: distcl.train.trainer).
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp, loopback_only():
        mp.setenv(API_SERVER_ENV, f"http://127.0.0.1:{port}")
        # The head takes no tasks (0 CPUs): every shard task has to go to a worker node.
        # A lost node is declared dead after 3 failed health checks 1 s apart (Ray's
        # default: 5 checks 3 s apart, ~15 s in which a memory shard that lived there
        # cannot restart: the node-loss test waited on it).
        health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        c = Cluster(initialize_head=True,
                    head_node_args={"num_cpus": 0, "_system_config": health,
                                    "include_dashboard": True, "dashboard_port": port,
                                    "dashboard_host": "127.0.0.1"})  # fmt: skip
        try:
            nodes = {
                name: c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")
            }
            c.wait_for_nodes()
            ray.init(address=c.address, logging_level="WARNING")
            assert c.address.startswith("127.0.0.1:")
            yield c, {n.node_id: name for name, n in nodes.items()}, nodes
        finally:
            ray.shutdown()
            c.shutdown()


def test_shard_building_spreads_over_the_worker_nodes(cluster, make_job, tmp_path):
    _, names, _ = cluster
    job = make_job(tmp_path, scenario={"tasks": 4})  # 8 x 32 + 8 x 8 items, shards of 16

    # Start a worker on each node first: on a loaded machine one node's first worker can
    # take as long as the whole build, and the other node would then write everything.
    @ray.remote(num_cpus=1)
    def warm(data, seed):
        from distcl.data.shards import _cached_source

        _cached_source(data, seed)
        return ray.get_runtime_context().get_node_id()

    ready = ray.get([warm.options(resources={n: 0.01}).remote(job.data, job.seed)
                     for n in ("node_a", "node_b")])  # fmt: skip
    assert {names[n] for n in ready} == {"node_a", "node_b"}
    placement: dict[str, str] = {}
    out, scen, rebuilt = build_shards(job, placement=placement)
    assert rebuilt
    manifest = load_manifest(out)
    assert set(placement) == {s["name"] for s in manifest["shards"]}
    by_node = collections.Counter(names.get(n, f"other:{n[:8]}") for n in placement.values())
    print("\nshard tasks per node:", dict(by_node))
    for shard, node in sorted(placement.items()):
        print(f"  {shard}: {names.get(node, node[:8])}")
    assert set(by_node) == {"node_a", "node_b"}  # both workers wrote shards, the head none
    assert min(by_node.values()) >= 2
    # The same bytes as one process writing everything.
    ref = tmp_path / "serial"
    ref.mkdir()
    plans = plan_shards(scen, job.data.shard_size)
    assert write_shards_serial(plans, str(ref), job.data, job.seed) == manifest["shards"]


def test_a_run_spreads_over_the_nodes_and_survives_losing_one(cluster, make_job, tmp_path,
                                                              monkeypatch):  # fmt: skip
    """2 Train workers (1 CPU each; the head has none) and 2 memory shards. Task 1 is held
    at the start of its second epoch (``DISTCL_PAUSE_AT``), node_b is removed (its raylet
    and every process on it killed) and node_c added; Ray Train restarts the worker group on
    node_a + node_c from the epoch checkpoint, a memory shard that lived on node_b restarts
    from its files. Must be the module's last test: it changes the cluster."""
    from distcl.pipeline import run_job

    c, names, nodes = cluster
    job = make_job(tmp_path, name="nodes", scenario={"tasks": 3}, method={"name": "cvs"},
                   memory={"per_class": 4, "shards": 2},
                   train={"epochs": 2, "max_failures": 3})  # fmt: skip
    marker = tmp_path / "paused"
    monkeypatch.setenv("DISTCL_PAUSE_AT", f"epoch:1:{marker}")
    result: dict = {}

    def drive():
        try:
            result["out"] = run_job(job, progress=False, log=lambda *a: None)
        except BaseException as e:  # reported by the assertion below
            result["error"] = e

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert driver.is_alive(), f"the run ended before task 1's second epoch: {result}"
        assert time.monotonic() < deadline, "task 1's second epoch was not reached"
        time.sleep(0.2)
    run = job.run_dir
    scenario = json.loads((run / "scenario.json").read_text())
    # Where things ran: task 0's ranks on both worker nodes, the memory shards apart.
    first = json.loads((run / "models" / "0" / "done.json").read_text())
    assert sorted(names[n] for n in first["nodes"]) == ["node_a", "node_b"], first
    memory = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("memory-nodes-"))  # fmt: skip
    assert len(memory) == 2, memory
    from distcl.localray import NAMESPACE

    where = [ray.get(ray.get_actor(m, namespace=NAMESPACE).node.remote()) for m in memory]
    print(
        f"\ntask 0 ranks: {[names[n] for n in first['nodes']]}; memory shards: "
        f"{[names.get(n, 'head') for n in where]}"
    )
    assert len(set(where)) == 2, where

    c.remove_node(nodes["node_b"], allow_graceful=False)
    added = c.add_node(num_cpus=1, resources={"node_c": 1})
    names[added.node_id] = "node_c"
    driver.join(900)
    assert not driver.is_alive(), "the run did not finish within 15 minutes of the node loss"
    assert "error" not in result, result.get("error")
    for t in range(3):
        history = json.loads((run / "models" / str(t) / "history.json").read_text())
        assert [h["epoch"] for h in history] == [0, 1], (t, history)
        done = json.loads((run / "models" / str(t) / "done.json").read_text())
        print(f"task {t}: ranks on {[names.get(n, n) for n in done['nodes']]}")
        assert len(set(done["nodes"])) == 2, done  # the two ranks on two nodes
        if t > 0:  # finished after the loss: on node_a and node_c
            assert sorted(names[n] for n in done["nodes"]) == ["node_a", "node_c"], done
        arriving = 8 * len(scenario["tasks"][t]["new_classes"])  # 8 test items per class
        for kind, items in (("eval/embeddings", 8 * 8), ("gallery", arriving)):
            parts = sorted((run / kind / f"model={t}").glob("part-*.parquet"))
            ids = [i for p in parts for i in pq.read_table(p, columns=["item_id"])[0].to_pylist()]
            assert len(ids) == len(set(ids)) == items, (kind, t)  # each item once, none lost
        assert len(parts) >= 1 and {p.name for p in parts} <= {"part-0.parquet", "part-1.parquet"}
    resumed = json.loads((run / "models" / "1" / "history.json").read_text())
    assert [h["resumed"] for h in resumed] == [False, True], resumed  # from the checkpoint
    from distcl.memory.service import MemoryShard

    stats = [MemoryShard(str(run / "memory"), s, 2, per_class=4).stats() for s in (0, 1)]
    per_class = {c: n for st in stats for c, n in st["per_class"].items()}
    committed = sorted({t for st in stats for t in st["tasks"]})
    seen = {c for t in committed for c in scenario["tasks"][t]["new_classes"]}
    assert committed and sorted(per_class) == sorted(seen), (stats, committed)
    assert set(per_class.values()) == {4}, stats  # every class seen keeps its exemplars
    assert result["out"]["eval"]["tasks"] == 3

"""Evaluation tasks on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster:
a head with CPUs and one worker node, each its own raylet, all on 127.0.0.1): every plan, scan
and finish task runs on the worker node, never on the head, and the rows equal the in-process
engine's.

Run: ``.venv/bin/python -m pytest tests/test_eval_multinode.py -q`` (markers ``ray``, ``slow``)
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import ray
from test_eval_engine import ALL, T, make_run

from distcl.eval import distributed as dist
from distcl.eval.engine import Engine, EvalSettings

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from distcl.raycompat import loopback_only

    if ray.is_initialized():
        ray.shutdown()
    with loopback_only():  # as tests/test_multinode.py
        # The head has CPUs too: only the placement keeps the evaluation tasks off it.
        c = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
        )
        try:
            worker = c.add_node(num_cpus=1)
            c.wait_for_nodes()
            ray.init(address=c.address, logging_level="WARNING")
            yield worker.node_id
        finally:
            ray.shutdown()
            c.shutdown()


def test_evaluation_tasks_avoid_the_head_node(cluster, make_job, tmp_path, monkeypatch):
    job = make_job(tmp_path, name="mn", data={"synthetic_classes": 10},
                   scenario={"tasks": T, "heldout_classes": 3},
                   eval={"protocols": list(ALL), "verification_pairs": 40, "folds": 4,
                         "distractor_classes": 1, "fars": [0.05, 0.2]})  # fmt: skip
    run, scen, *_ = make_run(job, parts=4)
    trace = tmp_path / "nodes.txt"  # every node of this cluster shares this file system

    def traced(fn, name):
        def task(*args):
            with open(trace, "a") as f:
                f.write(f"{name} {ray.get_runtime_context().get_node_id()}\n")
            return fn(*args)

        task.__name__ = name
        return task

    for name in ("_plan", "_scan", "_finish"):
        monkeypatch.setattr(dist, name, traced(getattr(dist, name), name))
    s = dataclasses.replace(EvalSettings.from_job(job, use_gpu=False), exact_map=False,
                            shard_rows=20)  # fmt: skip
    rows = dist.ray_rows(run, s, scen, list(range(T)))
    ran = collections.Counter(
        (line.split()[0], line.split()[1] == cluster) for line in trace.read_text().splitlines()
    )
    assert set(ran) == {("_plan", True), ("_scan", True), ("_finish", True)}, ran
    here = Engine(run, s, scen).rows(list(range(T)))
    for row in [*rows.values(), *here.values()]:
        row["stale"].pop("seconds")
    assert rows == here

"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and two
worker nodes, each its own raylet with its own resources, all on 127.0.0.1): shard building
spreads over the nodes, and the shards are the bytes a single process writes.

Run: ``.venv/bin/python -m pytest tests/test_multinode.py -q -s`` (markers ``ray``, ``slow``;
``-s`` prints which node wrote which shard)
"""

from __future__ import annotations

import collections

import pytest
import ray

from distcl.data.shards import build_shards, load_manifest, plan_shards, write_shards_serial

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Ray's single-machine mode keeps every node on 127.0.0.1 (otherwise Ray swaps in the
    # host's routable address: see distcl.localray); set for this process and the nodes.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        # The head takes no tasks (0 CPUs): every shard task has to go to a worker node.
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            nodes = {
                name: c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")
            }
            c.wait_for_nodes()
            ray.init(address=c.address, logging_level="WARNING")
            assert c.address.startswith("127.0.0.1:")
            yield c, {n.node_id: name for name, n in nodes.items()}
        finally:
            ray.shutdown()
            c.shutdown()


def test_shard_building_spreads_over_the_worker_nodes(cluster, make_job, tmp_path):
    _, names = cluster
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

"""Where services and tasks go on a multi-node Ray cluster: off the head node.

The head runs the drivers, the GCS and the Train controllers; the work goes to the other
nodes. ``worker_nodes`` lists them from ``ray.nodes()`` (the GCS, no State API); a one-node
Ray has none, and callers then schedule as usual (on the head, which is all there is).
"""

from __future__ import annotations

HEAD_RESOURCE = "node:__internal_head__"  # Ray gives this resource to the head node only


def worker_nodes(nodes: list[dict], gpu: bool) -> list[str]:
    """Ids of the nodes to run evaluation tasks and memory shards on (``nodes`` as
    ``ray.nodes()``): the alive ones other than the head with CPUs (with GPUs when ``gpu``);
    empty when there is none (one-node Ray: the default scheduling, on the head)."""
    need = "GPU" if gpu else "CPU"
    return [
        n["NodeID"]
        for n in nodes
        if n.get("Alive")
        and HEAD_RESOURCE not in n.get("Resources", {})
        and n.get("Resources", {}).get(need, 0) > 0
    ]


def spread_options(index: int, nodes: list[str]) -> dict:
    """Ray options placing item ``index`` of a service on ``nodes[index % len(nodes)]``, softly
    (it runs elsewhere if that node dies or cannot fit it); Ray's default scheduling for an
    empty list. Either way outside the caller's placement group: a Tune trial captures its
    children into its own (a 0.1-CPU bundle), which a service's resource request would not
    fit (seen: CL2R's memory shards failed every trial of the reference search's job)."""
    if not nodes:
        return {"scheduling_strategy": "DEFAULT"}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[index % len(nodes)],
                                                                   soft=True)}  # fmt: skip


def node_id() -> str | None:
    """This process's Ray node (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

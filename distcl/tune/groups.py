"""Placement groups a tuning search's ended trials left behind, removed by the search's driver.

A trial's Train workers live in a placement group. Ray Train's placement-group cleaner (a
detached actor per Train run, Ray's default) removes it when the run's controller dies, as it
does when Tune ends a trial's actor; but it learns the group only once the workers started. A
Train controller whose trial is ending can still create a group (its worker group failed as
the trial actor died, and it restarts it) and die before any worker starts: Ray keeps that
group, and its CPUs, until the search's job ends, and the next trials' workers wait for
them forever ("worker group startup timed out", seen in a reference search, Ray 2.60).

:class:`SweepIdleGroups` removes such a group: one of the search's job (trial actors and their
Train controllers run under it) that nothing has used for ``idle_s``. A live run's group is
in use from the moment its workers are placed (each holds a share of its
``bundle_group_<id>`` resource), which Ray Train does right after the group is created: a
minute of a created group with every bundle free is a leaked one. (It was 3 minutes: the
next trial waited that long whenever a group leaked, as the load test showed after the
fault-injection test, 247 s against 58 s.) Public API only (the GCS's placement-group table
and resource view; no State API).
"""

from __future__ import annotations

import time

from ray.tune import Callback


class SweepIdleGroups(Callback):
    """A Tune callback (in the search's driver): every ``sweep_every_s``, remove the search's
    placement groups that nothing has used for ``idle_s``."""

    def __init__(self, idle_s: float = 60.0, sweep_every_s: float = 10.0):
        self.idle_s, self.sweep_every_s = idle_s, sweep_every_s
        self.idle: dict[str, float] = {}  # group -> when first seen idle
        self.last_sweep = float("-inf")
        self.removed = 0

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove this search's groups idle for ``idle_s``; returns their ids."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        now = time.monotonic() if now is None else now
        job = ray.get_runtime_context().get_job_id()
        avail, total = ray.available_resources(), ray.cluster_resources()
        removed = []
        for pg_id, info in ray.util.placement_group_table().items():
            key = f"bundle_group_{pg_id}"
            idle = (info["state"] == "CREATED" and pg_id.endswith(job)
                    and key in total and avail.get(key, 0.0) >= total[key])  # fmt: skip
            if not idle:
                self.idle.pop(pg_id, None)
                continue
            if now - self.idle.setdefault(pg_id, now) >= self.idle_s:
                try:
                    remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
                except Exception as e:  # removed meanwhile
                    print(f"placement group {pg_id}: {e}", flush=True)
                else:
                    self.removed += 1
                    removed.append(pg_id)
                    print(f"removed placement group {pg_id}: nothing used it for "
                          f"{self.idle_s:.0f}s (a trial's dying Train controller left it)",
                          flush=True)  # fmt: skip
                self.idle.pop(pg_id, None)
        return removed

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_sweep >= self.sweep_every_s:
            self.last_sweep = now
            self.sweep(now)

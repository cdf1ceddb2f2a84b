"""Placement groups of ended tuning trials, removed by the search's driver.

Ray Train's own cleaner asks the State API, which on a machine with several Ray instances
may answer for another one (seen: it removed a live group of another session's Train run),
or not at all (then stopped trials leave their group and the next trials wait forever). So
the trials record their groups' ids and the search's driver removes them when a trial ends.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from distcl import storage
from distcl.storage import Uri
from distcl.train.groups import recorded_groups, release_groups, remove_group


class ReleaseTrialGroups(Callback):
    """A Tune callback (in the search's driver) that removes the Train placement groups of
    every trial that ended (stopped by ASHA, failed, completed): the trials record their
    ids in ``groups_dir/<trial id>.txt`` (``distcl.train.groups.group_recorder``). An ended
    trial is watched for ``linger_s`` more (a dying Train controller may still start a
    group), then dropped. Needs only the GCS (no State API, no dashboard)."""

    def __init__(self, groups_dir: str | Path | Uri, linger_s: float = 120.0,
                 orphan_s: float = 180.0, sweep_every_s: float = 10.0):  # fmt: skip
        self.groups_dir = storage.location(groups_dir)  # a folder or an object prefix
        self.linger_s = linger_s
        self.orphan_s, self.sweep_every_s = orphan_s, sweep_every_s
        self.ended: dict[str, float] = {}
        self.idle: dict[str, float] = {}  # unrecorded group -> when first seen idle
        self.last_sweep = float("-inf")
        self.released = 0

    def sweep_orphans(self, now: float | None = None) -> list[str]:
        """Remove this search's groups that no trial recorded and nothing has used for
        ``orphan_s``; returns their ids.

        The recorder sees a group only once its workers started. A Train controller whose
        trial is ending can still create one (its worker group failed as the trial actor
        died, and it restarts it) and die before the workers start; Ray keeps that group,
        and its CPUs, until the search's job ends, and the next trial's workers then wait
        forever (seen once in the reference search, in Ray 2.60). A group counts as this
        search's when Ray's id names this driver's job (trial actors and their Train
        controllers run under it); idle when its ``bundle_group_<id>`` resource is all
        available (any actor or task placed in it holds a share).
        """
        import ray

        now = time.monotonic() if now is None else now
        job = ray.get_runtime_context().get_job_id()
        recorded = {pg for e in storage.listdir(self.groups_dir) if e.name.endswith(".txt")
                    for pg in recorded_groups(self.groups_dir / e.name)}  # fmt: skip
        avail, total = ray.available_resources(), ray.cluster_resources()
        removed = []
        for pg_id, info in ray.util.placement_group_table().items():
            key = f"bundle_group_{pg_id}"
            idle = (info["state"] == "CREATED" and pg_id.endswith(job) and pg_id not in recorded
                    and key in total and avail.get(key, 0.0) >= total[key])  # fmt: skip
            if not idle:
                self.idle.pop(pg_id, None)
                continue
            if now - self.idle.setdefault(pg_id, now) >= self.orphan_s:
                if remove_group(pg_id):
                    self.released += 1
                    removed.append(pg_id)
                    print(f"removed placement group {pg_id}: no trial recorded it and nothing "
                          f"used it for {self.orphan_s:.0f}s", flush=True)  # fmt: skip
                self.idle.pop(pg_id, None)
        return removed

    def _release(self, trial_id: str) -> None:
        self.released += len(release_groups(self.groups_dir / f"{trial_id}.txt"))

    def _ended(self, trial) -> None:
        self.ended[trial.trial_id] = time.monotonic()
        self._release(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        for trial_id, t in list(self.ended.items()):
            self._release(trial_id)
            if now - t > self.linger_s:
                del self.ended[trial_id]
        if now - self.last_sweep >= self.sweep_every_s:
            self.last_sweep = now
            self.sweep_orphans(now)

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self.ended):
            self._release(trial_id)


# ------------------------------------------------------------------ the tuning run

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


class ReleaseTrialGroups(Callback):
    """A Tune callback (in the search's driver) that removes the Train placement groups of
    every trial that ended (stopped by ASHA, failed, completed): the trials record their
    ids in ``groups_dir/<trial id>.txt`` (``distcl.tune.trial._group_recorder``). An ended
    trial is watched for ``linger_s`` more (a dying Train controller may still start a
    group), then dropped. Needs only the GCS (no State API, no dashboard)."""

    def __init__(self, groups_dir: str | Path, linger_s: float = 120.0):
        self.groups_dir = Path(groups_dir)
        self.linger_s = linger_s
        self.ended: dict[str, float] = {}
        self.released = 0

    def _release(self, trial_id: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        path = self.groups_dir / f"{trial_id}.txt"
        if not path.is_file():
            return
        table = ray.util.placement_group_table()
        for pg_id in dict.fromkeys(path.read_text().split()):
            if table.get(pg_id, {}).get("state", "REMOVED") == "REMOVED":
                continue
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
                self.released += 1
            except Exception as e:  # removed meanwhile
                print(f"placement group {pg_id}: {e}", flush=True)

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

    def on_experiment_end(self, trials, **info):
        for trial_id in list(self.ended):
            self._release(trial_id)


# ------------------------------------------------------------------ the tuning run

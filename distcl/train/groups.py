"""The placement groups of a Train run: recorded by its controller, removed by its driver.

A Train run's worker group lives in a placement group that its controller creates, and that
Ray keeps until the job ends (or the controller removes it, at a normal end). When the
controller dies first (a crash, or the actor that called ``fit`` killed, as Tune stops a
trial), the group and its CPUs stay taken while the driver lives. Ray Train's answer is a
detached cleaner actor per run, which asks the State API every second whether the
controller lives: a process (~1.5 core-s on 2 cores, a run's start-up) per run, and on a
machine with several Ray instances a State API that may answer for another one (see
:mod:`distcl.tune.groups`). distcl's runs record each group's id instead
(:func:`group_recorder`, a controller callback), and the process that called ``fit``
removes what is left of them when ``fit`` returns or raises (:func:`release_groups`):
``distcl.train.driver.Run.train``. A tuning trial's file is also read by the search's
driver, which outlives a killed trial (:class:`distcl.tune.groups.ReleaseTrialGroups`).
Only the GCS is asked (no State API, no dashboard).
"""

from __future__ import annotations

from distcl import storage
from distcl.storage import Loc


def group_recorder(path: str):
    """A Ray Train worker-group callback (it runs in the Train controller) that appends the
    id of every placement group its worker groups get to ``path`` (a file or an object;
    one writer, the run's controller)."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            try:
                state = worker_group.get_worker_group_state()
                pg = state.placement_group_handle.placement_group
                loc = storage.location(path)
                old = storage.read_text(loc) if storage.is_file(loc) else ""
                storage.write_text(loc, old + pg.id.hex() + "\n")
            except Exception as e:  # never fail a run for its bookkeeping
                print(f"could not record the worker placement group: {e}", flush=True)

    return PlacementGroupRecorder()


def recorded_groups(path: str | Loc) -> list[str]:
    """The group ids recorded in ``path`` (none if there is no such file), in order."""
    loc = storage.location(path)
    return list(dict.fromkeys(storage.read_text(loc).split())) if storage.is_file(loc) else []


def remove_group(pg_id: str) -> bool:
    """Remove the placement group ``pg_id`` (hex); False if it was removed meanwhile."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    except Exception as e:  # removed meanwhile
        print(f"placement group {pg_id}: {e}", flush=True)
        return False
    return True


def release_groups(path: str | Loc) -> list[str]:
    """Remove every group recorded in ``path`` that Ray still holds; returns their ids. A
    group of an earlier Ray instance, or one its controller removed, is skipped."""
    import ray

    ids = recorded_groups(path)
    if not ids:
        return []
    table = ray.util.placement_group_table()
    live = [g for g in ids if table.get(g, {}).get("state", "REMOVED") != "REMOVED"]
    return [g for g in live if remove_group(g)]

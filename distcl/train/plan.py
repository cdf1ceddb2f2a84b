"""The run plan: everything a Train worker reads, built once by the driver (``Run.plan``).

Frozen and picklable, without torch (the driver and a tuning trial's actor never import
it): the job, the scenario's per-task classes and shard lists, where the old model of each
task comes from, what the method needs (one :class:`~distcl.catalog.Needs`, its replay share
resolved) and the handles of the run's services. It travels to the workers as one object
ref; nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distcl.catalog import Needs
from distcl.schema import JobConfig

#: A WebDataset shard: (path or URI, samples per the manifest).
Shard = tuple[str, int]


@dataclass(frozen=True)
class TaskPlan:
    """One task as the workers train and finish it."""

    index: int
    new_classes: tuple[int, ...]
    seen_classes: tuple[int, ...]  # this task's included
    old_classes: tuple[int, ...]  # seen before this task
    train_shards: tuple[Shard, ...]  # what the task trains on (tasks 0..t for joint)
    memory_shards: tuple[Shard, ...]  # the task's own training items (exemplar candidates)
    old_model_dir: str | None  # the frozen old model: model t-1, or an external one for t=0

    @property
    def train_paths(self) -> list[str]:
        return [path for path, _ in self.train_shards]

    @property
    def train_count(self) -> int:
        return sum(count for _, count in self.train_shards)


@dataclass(frozen=True)
class RunPlan:
    """A run as its workers see it (one Ray Train run over tasks ``first .. upto - 1``)."""

    job: JobConfig
    run_dir: str
    num_tasks: int
    upto: int  # train tasks before this one
    num_classes: int  # the dataset's label space (heads are pre-allocated for it)
    in_channels: int
    scenario_digest: str
    train_digest: str  # names the Ray Train run: a checkpoint of another config never resumes
    needs: Needs  # the method's, replay share resolved (``catalog.needs_of``)
    tasks: tuple[TaskPlan, ...]
    eval_shards: tuple[Shard, ...]  # the evaluation set (held-out classes included)
    # the run's services (handles), None where unused
    memory: Any = None  # a MemoryService
    progress: Any = None  # a RunProgress page (rank 0 posts to it)
    score_fn: Callable[[str, int], dict] | None = None  # after task t, on rank 0 (tuning)
    tracking: dict | None = None  # rank 0 logs into the run's tracker (distcl.tracking)
    fault: str | None = None  # DISTCL_FAULT (fault-injection tests)
    pause: str | None = None  # DISTCL_PAUSE_AT

    @property
    def uses_memory(self) -> bool:
        """The memory service keeps exemplars or class means for this method."""
        return self.needs.memory

    @property
    def eval_count(self) -> int:
        return sum(count for _, count in self.eval_shards)

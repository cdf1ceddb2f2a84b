"""distcl's Ray Train trainer: Ray Train V2's data-parallel trainer with distcl's torch
process-group backend (:class:`~distcl.train.backend.TorchBackendConfig`), which is what
``TorchTrainer`` adds to it, less the torch import: the driver and a tuning trial's actor
never load torch (the Train workers do). Its controller callbacks are Ray's but two
(:func:`~distcl.train.backend.lean_callbacks`: no datasets callback, no placement-group
cleaner actor), plus a recorder of the run's placement groups, which ``fit`` removes when
it ends (:mod:`distcl.train.groups`): two actor processes fewer per run.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import uuid

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from distcl.train.backend import TorchBackendConfig, lean_callbacks
from distcl.train.groups import group_recorder, release_groups


def run_sequence(loop_config: dict) -> dict:
    """Ray Train's ``train_loop_per_worker`` of a distcl run: :func:`distcl.train.loop.
    train_sequence_loop`, imported on the worker (the driver names this function, which
    pickles by reference: the driver imports this module, not the loop's torch)."""
    entered = time.time()  # wall clock: the driver compares it with its own
    from distcl.train.loop import train_sequence_loop

    return {**train_sequence_loop(loop_config), "entered_at": entered}


class Trainer(DataParallelTrainer):
    """``Trainer(train_fn, train_loop_config=..., scaling_config=..., run_config=...)``, as
    ``TorchTrainer``; ``torch_config`` defaults to :class:`TorchBackendConfig` (gloo on CPUs,
    nccl on GPUs). The run's placement groups are recorded in ``groups_file`` (default: a
    temporary file; the controller runs on this node) and what is left of them is removed
    when ``fit`` returns or raises (:mod:`distcl.train.groups`), in place of Ray's cleaner
    actor per run."""

    def __init__(self, *args, torch_config: TorchBackendConfig | None = None,
                 groups_file: str | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, backend_config=torch_config or TorchBackendConfig(), **kwargs)
        self._own_groups_file = groups_file is None
        self.groups_file = groups_file or os.path.join(
            tempfile.gettempdir(), f"distcl-groups-{uuid.uuid4().hex}.txt"
        )

    def _create_default_callbacks(self) -> list:
        return [*lean_callbacks(super()._create_default_callbacks(), bool(self.datasets)),
                group_recorder(self.groups_file)]  # fmt: skip

    def fit(self):
        # In the main thread Ray Train installs a SIGINT handler that aborts the run, and
        # leaves it installed: it holds the controller's handle, so the finished run's
        # controller (a process, ~200 MB) lived on until the next run or the process's end.
        main = threading.current_thread() is threading.main_thread()
        sigint = signal.getsignal(signal.SIGINT) if main else None
        try:
            return super().fit()
        finally:
            if main:
                signal.signal(signal.SIGINT, sigint)
            try:
                release_groups(self.groups_file)
            except Exception as e:  # never hide how the run ended (e.g. Ray itself gone)
                print(f"could not release the run's placement groups: {e}", flush=True)
            if self._own_groups_file and os.path.exists(self.groups_file):
                os.unlink(self.groups_file)

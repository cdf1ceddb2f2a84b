"""distcl's Ray Train trainer: Ray Train V2's public ``DataParallelTrainer`` with distcl's torch
process-group backend (:class:`~distcl.train.backend.TorchBackendConfig`), which is what
``TorchTrainer`` adds to it, less the torch import: the driver and a tuning trial's actor
never load torch (the Train workers do), and the run's controller holds 201 MB instead of
~670 MB (``cluster/README.md``: what that is worth at tens of concurrent trials).

Ray Train's default controller callbacks are kept as they are, its placement-group cleaner
included: a detached actor per run that removes the run's worker placement group when the
controller dies (a crash, or Tune stopping a trial). It asks the State API (the dashboard,
``ray[default]``), so it must reach the Ray instance the run belongs to: every Ray that distcl
starts names its own dashboard to its processes (``RAY_API_SERVER_ADDRESS``,
:func:`distcl.localray.init_ray`).
"""

from __future__ import annotations

import signal
import threading
import time

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from distcl.train.backend import TorchBackendConfig


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
    nccl on GPUs)."""

    def __init__(self, *args, torch_config: TorchBackendConfig | None = None, **kwargs):
        super().__init__(*args, backend_config=torch_config or TorchBackendConfig(), **kwargs)

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

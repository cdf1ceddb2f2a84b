"""distcl's Ray Train trainer: Ray Train V2's data-parallel trainer with distcl's torch
process-group backend (:class:`~distcl.train.backend.TorchBackendConfig`), which is what
``TorchTrainer`` adds to it, less the torch import: the driver and a tuning trial's actor
never load torch (the Train workers do). Its controller callbacks are Ray's but two
(:func:`~distcl.train.backend.lean_callbacks`): per run, one actor process fewer and no wait
for the placement-group cleaner at the end (a 2-task smoke run: 10.6 -> 9.6 s on 2 cores).
"""

from __future__ import annotations

import time

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from distcl.train.backend import TorchBackendConfig, lean_callbacks


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

    def _create_default_callbacks(self) -> list:
        return lean_callbacks(super()._create_default_callbacks(), bool(self.datasets))

"""distcl's Ray Train trainer: a ``TorchTrainer`` with distcl's process-group backend
(:class:`~distcl.train.backend.TorchBackendConfig`, no torch in the controller) and the
controller callbacks of :func:`~distcl.train.backend.lean_callbacks`: per run, one actor
process fewer and no 1-s wait at the end (a 2-task smoke run: 10.6 -> 9.6 s on 2 cores)."""

from __future__ import annotations

from ray.train.torch import TorchTrainer

from distcl.train.backend import TorchBackendConfig, lean_callbacks


class Trainer(TorchTrainer):
    def __init__(self, *args, torch_config: TorchBackendConfig | None = None, **kwargs):
        super().__init__(*args, torch_config=torch_config or TorchBackendConfig(), **kwargs)

    def _create_default_callbacks(self) -> list:
        return lean_callbacks(super()._create_default_callbacks(), bool(self.datasets))

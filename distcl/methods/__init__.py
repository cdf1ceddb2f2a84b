"""Training methods: one small file each, composing loss terms from ``distcl.losses``.

Registry: ``METHODS[name]``. Alignment terms (``method.align`` in a job) add to any method.
"""

from __future__ import annotations

from distcl.methods import align as _align  # noqa: F401  (registers alignment terms)
from distcl.methods import bct, cl2r, cvs, finetune, joint, lwf, mmd  # noqa: F401, E402
from distcl.methods.base import (
    METHODS,
    Batch,
    Method,
    Needs,
    TaskContext,
    method_params,
    register_method,
)


def validate_method_config(cfg) -> None:
    """Raise ValueError naming the field if the method or its params are wrong."""
    params = method_params(cfg.name, dict(cfg.params))
    from distcl.config import ConfigError

    fraction = getattr(params, "replay_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:  # a batch of B new rows gets B * f / (1 - f) replayed ones
        raise ConfigError(f"method.params.replay_fraction: must be in [0, 1), got {fraction}")

    for i, term in enumerate(cfg.align):
        if term.weight < 0:
            raise ConfigError(f"method.align[{i}].weight: must be >= 0")


__all__ = [
    "METHODS", "Batch", "Method", "Needs", "TaskContext", "method_params",
    "register_method", "validate_method_config",
]  # fmt: skip

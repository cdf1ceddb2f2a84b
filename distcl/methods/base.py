"""The method interface: a method declares what it needs and returns named loss terms.

The engine (``distcl.train.loop``) owns the optimiser: it runs the new model (and the
frozen old one when asked), calls ``method.loss(batch, new, old)``, sums the returned
terms, backpropagates, steps and logs every term. A method never calls ``backward()``.

    @METHODS.register()
    class MyMethod(MineSpec, Method):        # the spec: name, Params, needs (distcl.catalog)
        def loss(self, batch, new, old) -> dict[str, Tensor]: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distcl.catalog import (  # noqa: F401  (re-exported: the method interface)
    MethodSpec,
    Needs,
    Params,
    Positive,
    ReplayFraction,
    Weight,
)
from distcl.registry import Registry


@dataclass
class TaskContext:
    """What the engine knows about the current task, handed to methods."""

    task: int
    num_tasks: int
    num_classes: int  # size of the label space (heads are pre-allocated for it)
    new_classes: tuple[int, ...]
    seen_classes: tuple[int, ...]  # including this task's
    old_classes: tuple[int, ...]  # seen before this task
    embedding_dim: int
    #: (C, D) means and (C,) labels: CVS's E_c or BCT's old-model means of new classes.
    class_means: torch.Tensor | None = None
    class_mean_labels: torch.Tensor | None = None
    old_class_means: torch.Tensor | None = None
    old_class_mean_labels: torch.Tensor | None = None
    #: Frozen classifier rows of the old model (C, D) (BCT).
    old_head_weight: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: The old model's embedding size (None: no old model) and how sizes meet when it
    #: differs from ``embedding_dim`` (``model.dim_change``; ``Method.common``).
    old_dim: int | None = None
    dim_change: str = "pad"

    @property
    def common_dim(self) -> int:
        """The size new and old embeddings are compared in (``embedding_dim`` unless an
        upgrade changed it)."""
        from distcl.losses.dims import common_dim

        if self.old_dim is None or self.old_dim == self.embedding_dim:
            return self.embedding_dim
        return common_dim(self.embedding_dim, self.old_dim, self.dim_change)


@dataclass
class Batch:
    """One training batch on the worker's device."""

    images: torch.Tensor  # (B, C, H, W) float in [0, 1]
    labels: torch.Tensor  # (B,) int64
    from_memory: torch.Tensor  # (B,) bool: replayed exemplars
    #: Per-rank rows -> the global batch (differentiable all-gather under DDP; None: this
    #: process holds the whole batch). Batch-spanning loss terms take it.
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None


class Method(MethodSpec, nn.Module):
    """Base class. Subclasses inherit their spec (``name``, ``Params``, ``needs_for``, in
    ``distcl.catalog``) and implement ``loss``.

    It is an ``nn.Module`` so that learned parts a method owns (a projection, a
    discriminator) are trained by the engine's optimiser and saved with the checkpoint.
    """

    def __init__(self, params: Any, ctx: TaskContext):
        super().__init__()
        self.params = params
        self.ctx = ctx

    def needs(self) -> Needs:
        return self.needs_for(self.params)

    def begin_task(self, old_model: nn.Module) -> dict[str, Any]:
        """Per-task preparation on each worker, given the frozen old model; returns what it
        computes (stored in ``ctx.extras``), never mutates hidden state."""
        return {}

    def loss(
        self, batch: Batch, new: dict[str, torch.Tensor], old: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- helpers shared by methods ----------------------------------------------------
    def common(self, new: dict, old_value: torch.Tensor, key: str = "feat") -> tuple:
        """``new[key]`` and an old-model tensor of the old embedding size (old features,
        embeddings, class means) in one space (``model.dim_change``): unchanged when the
        sizes agree; ``projection`` takes the new model's learned map (``feat_compat``)."""
        return common_pair(new, old_value, key, self.ctx.dim_change)

    def seen_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with classes not seen yet masked out (heads are pre-allocated)."""
        mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
        mask[list(self.ctx.seen_classes)] = 0.0
        return logits + mask


def common_pair(new: dict, old_value: torch.Tensor, key: str, mode: str) -> tuple:
    """See :meth:`Method.common` (shared with the alignment terms)."""
    import torch.nn.functional as F

    from distcl.losses.dims import common_space

    value = new[key]
    if value.shape[-1] == old_value.shape[-1]:
        return value, old_value
    if mode == "projection":
        mapped = new["feat_compat"]  # (B, d_old): the new model's map into the old space
        return (F.normalize(mapped, dim=1) if key == "emb" else mapped), old_value
    return common_space(value, old_value, mode, renormalize=key == "emb")


METHODS: Registry[type[Method]] = Registry("method")

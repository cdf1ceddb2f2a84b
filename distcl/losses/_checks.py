"""Shape/dtype checks shared by the loss functions; errors name the offending argument."""

from __future__ import annotations

from collections.abc import Callable

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]


def check_matrix(name: str, t: torch.Tensor) -> None:
    """``t`` must be a 2-D floating tensor (N, D)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """``a`` and ``b`` must have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_labels(labels: torch.Tensor, n: int, name: str = "labels") -> None:
    """``labels`` must be an integer vector of length ``n``."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")


def check_positive(name: str, value: float) -> None:
    """``value`` must be > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances (N, M) between rows of ``a`` (N, D) and ``b`` (M, D)."""
    # The expansion avoids an (N, M, D) intermediate; clamp removes tiny negative round-off.
    sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(0.0)


def zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar 0 attached to ``t``'s graph, so ``backward()`` works when a term is empty."""
    return t.sum() * 0.0

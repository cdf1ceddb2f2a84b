"""Metric-learning and distribution losses: batch-hard triplet and biased MMD^2."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distcl.losses._checks import (
    Gather,
    check_labels,
    check_matrix,
    pairwise_sq_dists,
    zero_like_graph,
)

__all__ = ["DEFAULT_MMD_SIGMAS", "batch_hard_triplet_loss", "mmd"]

# Bandwidths for L2-normalised embeddings (squared distances in [0, 4]); pass wider ones for
# unnormalised features.
DEFAULT_MMD_SIGMAS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


def batch_hard_triplet_loss(
    emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, gather: Gather | None = None
) -> torch.Tensor:
    """Batch-hard triplet (Hermans et al. 2017): for each anchor, the farthest positive
    (same label, not itself) and the closest negative, ``relu(d_ap - d_an + margin)`` on
    euclidean distances of ``emb`` as given; mean over anchors that have both; 0 if none.

    ``gather`` (identity by default) maps a per-rank tensor to the global batch (every rank's
    rows concatenated, the same order for ``emb`` and ``labels``); the loss is then the one of
    the global batch. Use a differentiable gather (``torch.distributed.nn.all_gather``) so
    gradients reach every rank's rows.
    """
    check_matrix("emb", emb)
    check_labels(labels, emb.shape[0])
    if gather is not None:
        emb, labels = gather(emb), gather(labels)
    n = emb.shape[0]
    # sqrt of a clamped value keeps the gradient finite for coincident points.
    dist = pairwise_sq_dists(emb, emb).clamp_min(1e-12).sqrt()  # (N, N)
    same = labels[:, None] == labels[None, :]  # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    is_pos = same & ~eye
    is_neg = ~same
    d_pos = dist.masked_fill(~is_pos, float("-inf")).max(1).values  # (N,) hardest positive
    d_neg = dist.masked_fill(~is_neg, float("inf")).min(1).values  # (N,) hardest negative
    valid = is_pos.any(1) & is_neg.any(1)
    if not bool(valid.any()):
        return zero_like_graph(emb)
    return F.relu(d_pos - d_neg + margin)[valid].mean()


def mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas: Sequence[float] = DEFAULT_MMD_SIGMAS,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Biased MMD^2 estimate between samples ``x`` (N, D) and ``y`` (M, D):
    ``mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y)`` over all pairs (diagonals included),
    ``k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2))`` over ``sigmas``.

    ``gather`` (identity by default) maps per-rank rows to the global batch first.
    """
    check_matrix("x", x)
    check_matrix("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"x and y must not be empty, got {x.shape[0]} and {y.shape[0]} rows")
    sigmas = tuple(float(s) for s in sigmas)
    if len(sigmas) == 0 or min(sigmas) <= 0:
        raise ValueError(f"sigmas must be a non-empty sequence of values > 0, got {sigmas}")
    if gather is not None:
        x, y = gather(x), gather(y)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = pairwise_sq_dists(a, b)  # (|a|, |b|)
        return sum(torch.exp(-sq / (2.0 * s * s)) for s in sigmas).mean()

    return kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)

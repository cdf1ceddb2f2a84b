"""Contrastive compatibility between a new model and a frozen old one.

Convention as in :mod:`distcl.losses.distillation`: ``old_*`` arguments are targets, detached
here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcl.losses._checks import (
    Gather,
    check_labels,
    check_matrix,
    check_positive,
    check_same_shape,
)

__all__ = ["hoc_infonce_loss"]


def hoc_infonce_loss(
    feat_new: torch.Tensor,
    feat_old: torch.Tensor,
    labels: torch.Tensor,
    mu: float = 10.0,
    gather: Gather | None = None,
) -> torch.Tensor:
    """HOC's old-new InfoNCE term (Biondi et al., CVPR 2024), as its public code computes it
    (iamcl2r ``methods/hoc.py``):

        o, n = L2-normalised old and new features (B, D)      (normalised here)
        S = mu * o @ n.T                                       (B, B): row i is old item i
        L = mean_i [ -S[i, i] + logsumexp_j S'[i, j] ]

    where ``S'`` is ``S`` with every same-class entry (``labels[i] == labels[j]``, the
    diagonal included) set to 0, not removed: each such entry adds exp(0) = 1 inside the
    row's sum, as in the public code. Pulls each new feature towards its own old feature and
    away from the old features of other classes.

    ``gather`` (identity by default) maps a per-rank tensor to the global batch: rows and
    columns are then the global batch's, as one process holding it would compute.
    """
    check_matrix("feat_new", feat_new)
    check_matrix("feat_old", feat_old)
    check_same_shape("feat_new", feat_new, "feat_old", feat_old)
    check_labels(labels, feat_new.shape[0])
    check_positive("mu", mu)
    new = F.normalize(feat_new.float(), dim=1)  # (B, D)
    old = F.normalize(feat_old.detach().float(), dim=1)  # (B, D)
    if gather is not None:
        new, old, labels = gather(new), gather(old), gather(labels)
    sim = mu * old @ new.T  # (B, B): old item i against new item j
    positive = -sim.diagonal()  # (B,)
    same = labels[:, None] == labels[None, :]  # (B, B), diagonal included
    negative = torch.logsumexp(sim.masked_fill(same, 0.0), dim=1)  # (B,)
    return (positive + negative).mean()

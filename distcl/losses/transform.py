"""The losses of a forward-compatible transformation h: old row -> new row (FCT, FastFill).

FCT (Ramanujan et al., CVPR 2022) regresses the new model's feature:

    L_fct = mean_i (1/d) ||h(x_i) - phi_new(x_i)||^2

FastFill (Jaeckle et al., ICLR 2023) adds the new model's frozen classifier on h's output and
a per-item uncertainty s_i = log sigma_i^2 predicted from h's output (a heteroscedastic
likelihood, Kendall and Gal style, with one scalar sigma per item):

    L_ff = mean_i [ 0.5 exp(-s_i) ((1/d) ||h(x_i) - phi_new(x_i)||^2
                                    + w_disc CE_ls(W_new h(x_i), y_i)) + 0.5 s_i ]

with label smoothing 0.1 in the CE (FastFill's public code: the weight of the log term is
0.5, not d / 2; both terms are scaled by exp(-s)). Items h maps badly learn a large s, which
is what FastFill backfills first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcl.losses._checks import check_labels, check_matrix, check_same_shape

__all__ = ["fastfill_loss", "transformation_mse"]


def transformation_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) per-item mean squared error over the d dimensions (FCT's term, per item)."""
    check_matrix("out", out)
    check_same_shape("out", out, "target", target)
    return (out - target.detach()).pow(2).mean(dim=1)


def fastfill_loss(
    out: torch.Tensor,
    target: torch.Tensor,
    log_var: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    disc_weight: float = 1.0,
    label_smoothing: float = 0.1,
) -> dict[str, torch.Tensor]:
    """FastFill's terms for a batch (see the module docstring): ``out`` (B, d) = h(old rows),
    ``target`` (B, d) the new model's rows (detached), ``log_var`` (B,) or (B, 1) the sigma
    head's s = log sigma^2 (None: FCT, plain MSE), ``logits`` (B, C) the new model's
    classifier on ``out`` and ``labels`` (B,) (None: no discriminative term).

    Returns ``{"mse", "disc", "sigma"}`` (the terms present), whose sum is L_ff (or L_fct)."""
    per = transformation_mse(out, target)  # (B,)
    disc = None
    if logits is not None:
        check_matrix("logits", logits)
        check_labels(labels, logits.shape[0])
        disc = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if log_var is None:
        terms = {"mse": per.mean()}
        if disc is not None:
            terms["disc"] = disc_weight * disc.mean()
        return terms
    s = log_var.reshape(-1)
    if s.shape[0] != per.shape[0]:
        raise ValueError(f"log_var must have one value per row ({per.shape[0]}), got "
                         f"shape {tuple(log_var.shape)}")  # fmt: skip
    w = 0.5 * torch.exp(-s)
    terms = {"mse": (w * per).mean()}
    if disc is not None:
        terms["disc"] = (w * disc_weight * disc).mean()
    terms["sigma"] = 0.5 * s.mean()
    return terms

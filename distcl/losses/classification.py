"""Classification losses: plain cross-entropy and normalised softmax (cosine logits / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcl.losses._checks import check_labels, check_matrix, check_positive

__all__ = ["cross_entropy", "norm_softmax_loss"]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, C) against integer ``labels`` (B,)."""
    check_matrix("logits", logits)
    check_labels(labels, logits.shape[0])
    return F.cross_entropy(logits, labels)


def norm_softmax_loss(
    emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """NormSoftmax (CVS): cross-entropy of ``cos(emb_i, weight_c) / temperature``.

    ``emb`` (B, D) and the class weights ``weight`` (C, D) are L2-normalised here.
    """
    check_matrix("emb", emb)
    check_matrix("weight", weight)
    if emb.shape[1] != weight.shape[1]:
        raise ValueError(
            f"emb and weight must have the same dimension, got {emb.shape[1]} and {weight.shape[1]}"
        )
    check_labels(labels, emb.shape[0])
    check_positive("temperature", temperature)
    logits = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T / temperature  # (B, C)
    return F.cross_entropy(logits, labels)

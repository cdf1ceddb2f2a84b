"""Distillation / compatibility losses between a new model and a frozen old one.

Convention: every ``old_*`` argument (and stored class means) is a target and is detached
here, so a caller cannot train the old model by accident. Each term is 0 when new == old.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from distcl.losses._checks import (
    Gather,
    check_labels,
    check_matrix,
    check_positive,
    check_same_shape,
    pairwise_sq_dists,
    zero_like_graph,
)

__all__ = [
    "coherence_loss",
    "cosine_distillation_loss",
    "kd_loss",
    "l2_feature_loss",
    "layerwise_alignment_loss",
    "projection_loss",
    "triplet_distillation_loss",
]


def kd_loss(
    new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Hinton knowledge distillation (LwF, MMD-FGIR):
    ``KL(softmax(old / T) || softmax(new / T)) * T^2``, summed over classes, mean over batch.

    Both logits are (B, C) over the same classes: slice the new head's logits to the old
    classes (``new_logits[:, :C_old]``) before calling.
    """
    check_matrix("new_logits", new_logits)
    check_matrix("old_logits", old_logits)
    check_same_shape("new_logits", new_logits, "old_logits", old_logits)
    check_positive("temperature", temperature)
    log_p_new = F.log_softmax(new_logits / temperature, dim=1)  # (B, C)
    log_p_old = F.log_softmax(old_logits.detach() / temperature, dim=1)  # (B, C)
    kl = F.kl_div(log_p_new, log_p_old, reduction="batchmean", log_target=True)
    return kl * temperature**2


def old_class_kd_loss(
    new_logits: torch.Tensor,
    old_logits: torch.Tensor,
    old_classes: Sequence[int],
    temperature: float = 2.0,
) -> torch.Tensor:
    """``kd_loss`` restricted to the columns of the classes the old model knew (LwF, MMD,
    the ``kd`` alignment term): both heads are pre-allocated for every class."""
    cols = list(old_classes)
    return kd_loss(new_logits[:, cols], old_logits[:, cols], temperature)


def triplet_distillation_loss(
    new_emb: torch.Tensor,
    old_emb: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.1,
    gather: Gather | None = None,
) -> torch.Tensor:
    """CVS inter-session triplet: anchor ``new_emb[i]``, positive ``old_emb[i]`` (same image,
    old model), negative the ``old_emb[n]`` with ``labels[n] != labels[i]`` closest to the
    anchor. ``relu(d(a, p) - d(a, n) + margin)`` on squared euclidean distances of
    L2-normalised embeddings (normalised here), mean over anchors that have a negative;
    0 when none has.

    ``gather`` (identity by default) maps a per-rank tensor to the global batch (rows of every
    rank, concatenated); anchors and negatives are then drawn from the global batch.
    """
    check_matrix("new_emb", new_emb)
    check_matrix("old_emb", old_emb)
    check_same_shape("new_emb", new_emb, "old_emb", old_emb)
    check_labels(labels, new_emb.shape[0])
    anchor = F.normalize(new_emb, dim=1)  # (B, D)
    old = F.normalize(old_emb.detach(), dim=1)  # (B, D)
    if gather is not None:
        anchor, old, labels = gather(anchor), gather(old), gather(labels)
    d_pos = (anchor - old).pow(2).sum(1)  # (B,)
    d_all = pairwise_sq_dists(anchor, old)  # (B, B): anchor i to old n
    is_neg = labels[:, None] != labels[None, :]  # (B, B)
    d_neg = d_all.masked_fill(~is_neg, float("inf")).min(1).values  # (B,) hardest negative
    has_neg = is_neg.any(1)
    if not bool(has_neg.any()):
        return zero_like_graph(new_emb)
    return F.relu(d_pos - d_neg + margin)[has_neg].mean()


def _class_means_tensors(
    class_means: Mapping[int, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(class_means, Mapping):
        if len(class_means) == 0:
            empty = like.new_zeros((0, like.shape[1]))
            return empty, torch.zeros(0, dtype=torch.long, device=like.device)
        mean_labels = torch.tensor([int(c) for c in class_means], device=like.device)
        means = torch.stack([torch.as_tensor(m) for m in class_means.values()])
    elif isinstance(class_means, tuple) and len(class_means) == 2:
        means, mean_labels = class_means
    else:
        raise ValueError(
            "class_means must be a dict {class: mean (D,)} or a tuple (means (C, D), "
            f"mean_labels (C,)), got {type(class_means).__name__}"
        )
    check_matrix("class_means means", means)
    check_labels(mean_labels, means.shape[0], name="class_means mean_labels")
    if means.shape[1] != like.shape[1]:
        raise ValueError(
            f"class_means have dimension {means.shape[1]} but new_emb has {like.shape[1]}"
        )
    if torch.unique(mean_labels).numel() != mean_labels.numel():
        raise ValueError("class_means mean_labels must not repeat a class")
    return means.detach().to(like), mean_labels.to(like.device)


def coherence_loss(
    new_emb: torch.Tensor,
    labels: torch.Tensor,
    class_means: Mapping[int, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """CVS inter-session data coherence: mean of ``||new_emb_i - E_{labels_i}||^2`` over the
    samples whose class has a stored mean E_c; 0 when none has.

    ``class_means`` is ``{class: mean (D,)}`` or ``(means (C, D), mean_labels (C,))``.
    ``new_emb`` is used as given (pass the L2-normalised embedding, as the gallery stores).
    """
    check_matrix("new_emb", new_emb)
    check_labels(labels, new_emb.shape[0])
    means, mean_labels = _class_means_tensors(class_means, new_emb)
    match = labels[:, None] == mean_labels[None, :]  # (B, C), at most one True per row
    has_mean = match.any(1)  # (B,)
    if not bool(has_mean.any()):
        return zero_like_graph(new_emb)
    target = means[match.float().argmax(1)]  # (B, D); rows without a mean are masked below
    return (new_emb - target).pow(2).sum(1)[has_mean].mean()


def _mean_one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(a, b, dim=1)).mean()


def cosine_distillation_loss(new_emb: torch.Tensor, old_emb: torch.Tensor) -> torch.Tensor:
    """CL2R feature distillation: ``mean_i (1 - cos(new_emb_i, old_emb_i))``."""
    check_matrix("new_emb", new_emb)
    check_matrix("old_emb", old_emb)
    check_same_shape("new_emb", new_emb, "old_emb", old_emb)
    return _mean_one_minus_cos(new_emb, old_emb.detach())


def l2_feature_loss(new_feat: torch.Tensor, old_feat: torch.Tensor) -> torch.Tensor:
    """Feature replay / L2 alignment: ``mean_i ||new_feat_i - old_feat_i||^2``."""
    check_matrix("new_feat", new_feat)
    check_matrix("old_feat", old_feat)
    check_same_shape("new_feat", new_feat, "old_feat", old_feat)
    return (new_feat - old_feat.detach()).pow(2).sum(1).mean()


def projection_loss(projected_new: torch.Tensor, old_emb: torch.Tensor) -> torch.Tensor:
    """Projection matching: ``mean_i (1 - cos(P(new)_i, old_emb_i))`` where ``projected_new``
    (B, D_old) is the new embedding mapped by a learned P into the old space."""
    check_matrix("projected_new", projected_new)
    check_matrix("old_emb", old_emb)
    check_same_shape("projected_new", projected_new, "old_emb", old_emb)
    return _mean_one_minus_cos(projected_new, old_emb.detach())


def layerwise_alignment_loss(
    new_stages: Sequence[torch.Tensor],
    old_stages: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Layer-wise alignment: weighted mean over stages of ``mse(new_stage, old_stage)``
    (elementwise mean per stage). ``weights`` default to equal; otherwise the result is
    ``sum_s w_s * mse_s / sum_s w_s``."""
    if len(new_stages) == 0:
        raise ValueError("new_stages must not be empty")
    if len(new_stages) != len(old_stages):
        raise ValueError(
            f"new_stages and old_stages must have the same length, "
            f"got {len(new_stages)} and {len(old_stages)}"
        )
    if weights is None:
        weights = [1.0] * len(new_stages)
    if len(weights) != len(new_stages):
        raise ValueError(f"weights must have {len(new_stages)} entries, got {len(weights)}")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = None
    for s, (new, old) in enumerate(zip(new_stages, old_stages, strict=True)):
        if new.shape != old.shape:
            raise ValueError(
                f"new_stages[{s}] and old_stages[{s}] must have the same shape, "
                f"got {tuple(new.shape)} and {tuple(old.shape)}"
            )
        term = weights[s] * F.mse_loss(new, old.detach())
        total = term if total is None else total + term
    return total / sum(weights)

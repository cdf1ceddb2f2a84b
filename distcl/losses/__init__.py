"""Loss terms as pure functions: tensors in, scalar tensor out (no Ray, faiss or file I/O).

A method composes these into named terms (``{"ce": ..., "kd": ...}``); the engine sums and
backpropagates them. Losses that can use global batch statistics take ``gather`` (a callable
mapping a per-rank tensor to the global batch; identity by default), never a process group.
``old_*`` arguments are detached targets.

Test: ``.venv/bin/python -m pytest tests/test_losses.py -q``
"""

from __future__ import annotations

from distcl.losses.adversarial import (
    GradReverse,
    discriminator_loss,
    generator_loss,
    grad_reverse,
)
from distcl.losses.classification import cross_entropy, norm_softmax_loss
from distcl.losses.contrastive import hoc_infonce_loss
from distcl.losses.distillation import (
    coherence_loss,
    cosine_distillation_loss,
    kd_loss,
    l2_feature_loss,
    layerwise_alignment_loss,
    old_class_kd_loss,
    projection_loss,
    triplet_distillation_loss,
)
from distcl.losses.metric import DEFAULT_MMD_SIGMAS, batch_hard_triplet_loss, mmd
from distcl.losses.transform import fastfill_loss, transformation_mse

__all__ = [
    "DEFAULT_MMD_SIGMAS",
    "GradReverse",
    "discriminator_loss",
    "fastfill_loss",
    "generator_loss",
    "batch_hard_triplet_loss",
    "coherence_loss",
    "cosine_distillation_loss",
    "cross_entropy",
    "grad_reverse",
    "hoc_infonce_loss",
    "kd_loss",
    "old_class_kd_loss",
    "l2_feature_loss",
    "layerwise_alignment_loss",
    "mmd",
    "norm_softmax_loss",
    "projection_loss",
    "transformation_mse",
    "triplet_distillation_loss",
]

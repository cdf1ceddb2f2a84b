"""BCT (backward-compatible training): L(new) + lambda * CE(old classifier(phi_new(x)), y).

The influence loss passes the new embeddings through the frozen old classifier. Classes
the old model never saw get synthesised rows: the old model's mean embedding of that
class over the current task's data, rescaled to the mean norm of the old rows.

The influence loss is defined on samples of old classes. BCT's paper trains the new model
on a superset of the old training data; in a class-incremental scenario the old classes
come back only through the episodic memory, so BCT replays (``replay_fraction``, half of
each batch as in CL2R). With ``replay_fraction: 0`` the old classes never appear and the
loss only sees the synthesised rows of the new classes.

The old model may have another backbone or width (``old_model_dir``: a finished model
folder of another run, used as the old model of the first task), as long as the
embedding dimensions match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcl import losses
from distcl.catalog import BCTSpec
from distcl.methods.base import METHODS, Method


def influence_classifier(
    old_weight: torch.Tensor,
    old_bias: torch.Tensor | None,
    old_classes,
    new_means: torch.Tensor,
    new_labels,
) -> tuple:
    """(W, b) of the old classifier with rows of unseen classes replaced by the rescaled
    old-model class means. old_weight: (C, D); new_means: (K, D)."""
    weight = old_weight.clone()
    bias = old_bias.clone() if old_bias is not None else torch.zeros(len(weight))
    if len(old_classes):
        scale = old_weight[list(old_classes)].norm(dim=1).mean()
    else:
        scale = old_weight.norm(dim=1).mean()
    for row, c in zip(F.normalize(new_means, dim=1), new_labels, strict=True):
        if int(c) not in old_classes:
            weight[int(c)] = row * scale
            bias[int(c)] = 0.0
    return weight, bias


@METHODS.register()
class BCT(BCTSpec, Method):
    def begin_task(self, old_model) -> dict:
        ctx = self.ctx
        if ctx.old_class_means is None:
            return {}
        head = old_model.head
        bias = getattr(head, "bias", None)
        return {
            "old_head": influence_classifier(
                head.weight.detach().cpu(),
                None if bias is None else bias.detach().cpu(),
                set(ctx.old_classes),
                ctx.old_class_means,
                ctx.old_class_mean_labels.tolist(),
            )
        }

    def loss(self, batch, new, old):
        terms = {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}
        head = self.ctx.extras.get("old_head")
        if old is not None and head is not None:
            weight, bias = head
            # the old classifier (C, d_old) on the new features, in one space after an upgrade
            feat, weight = self.common(new, weight.to(new["feat"].device), "feat")
            logits = F.linear(feat, weight, bias.to(feat.device))
            terms["influence"] = self.params.lambda_ * losses.cross_entropy(
                self.seen_logits(logits), batch.labels
            )
        return terms

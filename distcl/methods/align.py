"""The alignment family: terms that pull the new model's features towards the old model's.

Each term can be used alone (``method: {name: finetune, align: [{name: l2}]}``) or added
to any other method by configuration; that is composition, not a copied method file:

    kd          KD(T=2) of old-class logits (LwF-style)
    l2          L2 feature replay: ||phi_new(x) - phi_old(x)||^2
    projection  a learned map P: new -> old space, 1 - cos(P phi_new(x), phi_old(x))
    layerwise   MSE between intermediate backbone stages of new and old
    adversarial a discriminator tells old from new embeddings; the new model is trained
                through a gradient-reversal layer to make them indistinguishable

Terms with learned parts (projection, adversarial) are ``nn.Module`` s, so the engine's
optimiser trains them with the model.
"""

from __future__ import annotations

import torch
from torch import nn

from distcl import losses
from distcl.methods.base import Batch, TaskContext, common_pair
from distcl.registry import Registry

ALIGN_TERMS: Registry[type[AlignTerm]] = Registry("alignment term")


class AlignTerm(nn.Module):
    name = ""
    needs_stages = False

    def __init__(self, cfg, ctx: TaskContext):  # cfg: distcl.config.AlignConfig
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx

    def rows(self, batch: Batch) -> torch.Tensor:
        """Which rows of the batch the term applies to."""
        if self.cfg.on == "memory":
            return batch.from_memory
        return torch.ones_like(batch.from_memory)

    def forward(self, batch: Batch, new: dict, old: dict) -> torch.Tensor:
        raise NotImplementedError

    def common(self, new: dict, old_value: torch.Tensor, key: str = "emb") -> tuple:
        """New and old in one space after an upgrade (``Method.common``)."""
        return common_pair(new, old_value, key, self.ctx.dim_change)


@ALIGN_TERMS.register()
class KDAlign(AlignTerm):
    name = "kd"

    def forward(self, batch, new, old):
        rows = self.rows(batch)
        if not self.ctx.old_classes or not rows.any():
            return new["emb"].sum() * 0.0
        return losses.old_class_kd_loss(
            new["logits"][rows], old["logits"][rows], self.ctx.old_classes, 2.0
        )


@ALIGN_TERMS.register()
class L2Align(AlignTerm):
    name = "l2"

    def forward(self, batch, new, old):
        rows = self.rows(batch)
        if not rows.any():
            return new["emb"].sum() * 0.0
        emb, old_emb = self.common(new, old["emb"])
        return losses.l2_feature_loss(emb[rows], old_emb[rows])


@ALIGN_TERMS.register()
class ProjectionAlign(AlignTerm):
    name = "projection"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d, d_old = ctx.embedding_dim, ctx.old_dim or ctx.embedding_dim  # new -> old space
        self.proj = nn.Linear(d, d_old, bias=False)
        nn.init.eye_(self.proj.weight)  # start as the identity map (on shared dimensions)

    def forward(self, batch, new, old):
        rows = self.rows(batch)
        if not rows.any():
            return new["emb"].sum() * 0.0
        return losses.projection_loss(self.proj(new["emb"][rows]), old["emb"][rows])


@ALIGN_TERMS.register()
class LayerwiseAlign(AlignTerm):
    name = "layerwise"
    needs_stages = True

    def forward(self, batch, new, old):
        rows = self.rows(batch)
        if not rows.any():
            return new["emb"].sum() * 0.0
        return losses.layerwise_alignment_loss(
            [s[rows] for s in new["stages"]], [s[rows] for s in old["stages"]]
        )


@ALIGN_TERMS.register()
class AdversarialAlign(AlignTerm):
    name = "adversarial"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        d = ctx.common_dim  # the space new and old embeddings meet in
        self.disc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1))

    def forward(self, batch, new, old):
        rows = self.rows(batch)
        if not rows.any():
            return new["emb"].sum() * 0.0
        # Gradient reversal: the discriminator minimises its BCE, the new model maximises it.
        emb, old_emb = self.common(new, old["emb"])
        new_logit = self.disc(losses.grad_reverse(emb[rows], 1.0)).squeeze(1)
        old_logit = self.disc(old_emb[rows].detach()).squeeze(1)
        return losses.discriminator_loss(new_logit, old_logit)


def build_align_terms(cfgs, ctx: TaskContext) -> nn.ModuleList:
    return nn.ModuleList(ALIGN_TERMS[c.name](c, ctx) for c in cfgs)

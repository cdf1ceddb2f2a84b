"""MMD incremental fine-grained retrieval (exemplar-free):

CE + batch-hard triplet + alpha * KD(T=2) on old classes
+ beta * MMD^2(new embeddings, old embeddings) of the current batch
  (Gaussian kernels summed over several bandwidths)
"""

from __future__ import annotations

from distcl import losses
from distcl.catalog import MMDSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class MMDRetrieval(MMDSpec, Method):
    def loss(self, batch, new, old):
        terms = {
            "ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels),
            "triplet": losses.batch_hard_triplet_loss(
                new["emb"], batch.labels, margin=self.params.margin, gather=batch.gather
            ),
        }
        if old is not None:
            if self.ctx.old_classes:
                terms["kd"] = self.params.alpha * losses.old_class_kd_loss(
                    new["logits"], old["logits"], self.ctx.old_classes, self.params.temperature
                )
            emb, old_emb = self.common(new, old["emb"], "emb")
            terms["mmd"] = self.params.beta * losses.mmd(
                emb, old_emb, sigmas=self.params.sigmas, gather=batch.gather
            )
        return terms

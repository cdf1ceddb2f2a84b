"""CVS (backward-consistent feature embedding for visual search):

    NormSoftmax CE (T=0.05)
    + alpha * triplet(anchor phi_t(x), positive phi_{t-1}(x), hardest negative
                      phi_{t-1}(x_n) of another class; margin 0.1)         alpha = 10
    + beta * ||phi_t(x) - E_c||^2  on current and replayed samples of classes with a
                                   stored mean E_c (mean embedding over sessions)  beta = 1

with iCaRL herding replay (set ``memory.selection: herding`` in the job). E_c is the
running mean of every training item's embedding, each embedded by the model current when
it arrived (the memory service keeps it): the stored-gallery means of the paper, computed
on training items so evaluation items never steer training.
"""

from __future__ import annotations

from distcl import losses
from distcl.catalog import CVSSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class CVS(CVSSpec, Method):
    def loss(self, batch, new, old):
        # The cosine head already gives cos / T logits (NormSoftmax).
        terms = {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}
        if old is not None:
            emb, old_emb = self.common(new, old["emb"], "emb")
            terms["triplet"] = self.params.alpha * losses.triplet_distillation_loss(
                emb,
                old_emb,
                batch.labels,
                margin=self.params.margin,
                gather=batch.gather,
            )
        if self.ctx.class_means is not None:
            # E_c lives in the old model's space (the stored gallery's): after an upgrade the
            # new embeddings meet it as model.dim_change says
            emb, means = self.common(new, self.ctx.class_means.to(new["emb"].device), "emb")
            terms["coherence"] = self.params.beta * losses.coherence_loss(
                emb, batch.labels, (means, self.ctx.class_mean_labels.to(emb.device))
            )
        return terms

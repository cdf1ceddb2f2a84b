"""CL2R (compatible lifelong learning representations): a fixed d-simplex classifier
(pre-allocated for every future class) + lambda * (1 - cos(phi_t(x), phi_{t-1}(x))) on
memory samples; half of each batch comes from the episodic memory.

lambda = lambda_base * sqrt(n_new / n_old) (new / old class counts), as in the paper's
public code; its default base there is 10. A task that brings no new class (data-incremental
tasks, or only recurring classes in a long ``general`` sequence) distils at lambda_base: the
paper's formula would switch the term off exactly where the sequence most needs it.
"""

from __future__ import annotations

import math

from distcl import losses
from distcl.catalog import CL2RSpec
from distcl.methods.base import METHODS, Method


def cl2r_lambda(base: float, n_old: int, n_new: int) -> float:
    """lambda = base * sqrt(n_new / n_old); 0 when there is no old class yet; ``base`` when
    the task brings no new class."""
    if n_old == 0:
        return 0.0
    return base if n_new == 0 else base * math.sqrt(n_new / n_old)


@METHODS.register()
class CL2R(CL2RSpec, Method):
    def loss(self, batch, new, old):
        # All K simplex logits: unseen vertices stay as fixed repelling prototypes.
        terms = {"ce": losses.cross_entropy(new["logits"], batch.labels)}
        if old is not None and batch.from_memory.any():
            mem = batch.from_memory
            lam = cl2r_lambda(
                self.params.lambda_, len(self.ctx.old_classes), len(self.ctx.new_classes)
            )
            feat, old_feat = self.common(new, old["feat"], "feat")
            terms["feat_distill"] = lam * losses.cosine_distillation_loss(feat[mem], old_feat[mem])
        return terms

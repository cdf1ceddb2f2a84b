"""HOC (Biondi et al., CVPR 2024, "Stationary representations: optimally approximating
compatibility"; public code miccunifi/iamcl2r):

    lambda * CE(fixed d-simplex logits, y) + (1 - lambda) * L_hoc(new, old, y)
    lambda = 0.1, mu = 10 (distcl.losses.hoc_infonce_loss)

on a stationary representation: the fixed d-simplex classifier with every class's vertex
allocated from the start (``model.head: simplex``, K = d + 1 vertices; CE over all K logits,
unseen ones included, as the public code), the previous model frozen, and L_hoc on every
batch item, new data and replayed exemplars alike (half of each batch from memory, 20 random
exemplars per class in the paper).

The first task has no previous model here (distcl trains its first model from scratch; the
paper's first model replaces a pretrained one, which its L_hoc then ties to): it trains with
plain cross-entropy, like ER's and CL2R's first task; lambda and mu act from the second task
on. Labels sit on vertices by class id (the public code uses 1023 - y: the simplex is
symmetric, so the order does not matter).
"""

from __future__ import annotations

from distcl import losses
from distcl.catalog import HOCSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class HOC(HOCSpec, Method):
    def loss(self, batch, new, old):
        ce = losses.cross_entropy(new["logits"], batch.labels)  # all K simplex logits
        if old is None:
            return {"ce": ce}
        lam = self.params.lambda_
        feat, old_feat = self.common(new, old["feat"], "feat")  # one space after an upgrade
        hoc = losses.hoc_infonce_loss(feat, old_feat, batch.labels, mu=self.params.mu,
                                      gather=batch.gather)  # fmt: skip
        return {"ce": lam * ce, "hoc": (1.0 - lam) * hoc}

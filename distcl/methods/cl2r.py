"""CL2R (compatible lifelong learning representations): a fixed d-simplex classifier
(pre-allocated for every future class) + lambda * (1 - cos(phi_t(x), phi_{t-1}(x))) on
memory samples; half of each batch comes from the episodic memory.

lambda = lambda_base * sqrt(n_new / n_old) (new / old class counts), as in the paper's
public code; its default base there is 10.
"""

from __future__ import annotations

import math

from pydantic import Field

from distcl import losses
from distcl.methods.base import METHODS, Method, Needs, Params, ReplayFraction, Weight


class CL2RParams(Params):
    lambda_: Weight = Field(
        10.0, alias="lambda"
    )  #: base weight of the feature distillation (``lambda`` in jobs)
    replay_fraction: ReplayFraction = 0.5  #: fraction of each batch drawn from memory


def cl2r_lambda(base: float, n_old: int, n_new: int) -> float:
    """lambda = base * sqrt(n_new / n_old); 0 when there is no old class yet."""
    return 0.0 if n_old == 0 else base * math.sqrt(n_new / n_old)


@METHODS.register()
class CL2R(Method):
    name = "cl2r"
    Params = CL2RParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(old_model=True, replay_fraction=params.replay_fraction, head="simplex")

    def loss(self, batch, new, old):
        # All K simplex logits: unseen vertices stay as fixed repelling prototypes.
        terms = {"ce": losses.cross_entropy(new["logits"], batch.labels)}
        if old is not None and batch.from_memory.any():
            mem = batch.from_memory
            lam = cl2r_lambda(
                self.params.lambda_, len(self.ctx.old_classes), len(self.ctx.new_classes)
            )
            terms["feat_distill"] = lam * losses.cosine_distillation_loss(
                new["feat"][mem], old["feat"][mem]
            )
        return terms

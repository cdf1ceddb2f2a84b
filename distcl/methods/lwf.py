"""LwF (learning without forgetting): CE + alpha * KD(T) of the old model's logits on the
old classes, computed on the current task's images (no exemplars)."""

from __future__ import annotations

from distcl import losses
from distcl.methods.base import METHODS, Method, Needs, Params, Positive, Weight


class LwFParams(Params):
    alpha: Weight = 1.0  #: weight of the distillation term
    temperature: Positive = 2.0  #: KD temperature (Hinton)


@METHODS.register()
class LwF(Method):
    name = "lwf"
    Params = LwFParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(old_model=True, head="linear")

    def loss(self, batch, new, old):
        terms = {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}
        if old is not None and self.ctx.old_classes:
            kd = losses.old_class_kd_loss(
                new["logits"], old["logits"], self.ctx.old_classes, self.params.temperature
            )
            terms["kd"] = self.params.alpha * kd
        return terms

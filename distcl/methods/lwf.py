"""LwF (learning without forgetting): CE + alpha * KD(T) of the old model's logits on the
old classes, computed on the current task's images (no exemplars)."""

from __future__ import annotations

from distcl import losses
from distcl.catalog import LwFSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class LwF(LwFSpec, Method):
    def loss(self, batch, new, old):
        terms = {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}
        if old is not None and self.ctx.old_classes:
            kd = losses.old_class_kd_loss(
                new["logits"], old["logits"], self.ctx.old_classes, self.params.temperature
            )
            terms["kd"] = self.params.alpha * kd
        return terms

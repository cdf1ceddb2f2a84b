"""fine-tune: cross-entropy on the current task only (the lower bound: it forgets)."""

from __future__ import annotations

from distcl import losses
from distcl.catalog import FinetuneSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class Finetune(FinetuneSpec, Method):
    def loss(self, batch, new, old):
        return {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}

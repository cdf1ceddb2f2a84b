"""fine-tune: cross-entropy on the current task only (the lower bound: it forgets)."""

from __future__ import annotations

from distcl import losses
from distcl.methods.base import METHODS, Method, Needs, Params


class FinetuneParams(Params):
    """No weights."""


@METHODS.register()
class Finetune(Method):
    name = "finetune"
    Params = FinetuneParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(head="linear")

    def loss(self, batch, new, old):
        return {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}

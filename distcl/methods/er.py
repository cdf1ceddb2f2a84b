"""ER (experience replay), iamcl2r's baseline for HOC: cross-entropy on the current task's
data and on replayed exemplars (half of each batch from the episodic memory by default), with
a learnable linear classifier; no compatibility term. Compatibility, if any, comes from replay
alone.
"""

from __future__ import annotations

from distcl import losses
from distcl.catalog import ERSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class ER(ERSpec, Method):
    def loss(self, batch, new, old):
        return {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}

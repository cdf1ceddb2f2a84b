"""joint: cross-entropy on every task's data seen so far (the upper bound).

The engine streams the training shards of tasks 0..t for task t (``Needs.all_data``).
"""

from __future__ import annotations

from dataclasses import dataclass

from distcl import losses
from distcl.methods.base import Method, Needs, register_method


@dataclass(frozen=True)
class JointParams:
    """No weights."""


@register_method
class Joint(Method):
    name = "joint"
    Params = JointParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(all_data=True, head="linear")

    def loss(self, batch, new, old):
        return {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}

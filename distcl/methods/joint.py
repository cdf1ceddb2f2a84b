"""joint: cross-entropy on every task's data seen so far (the upper bound).

The same loss as fine-tune; the engine streams the training shards of tasks 0..t for
task t (``Needs.all_data``).
"""

from __future__ import annotations

from distcl.methods.base import METHODS, Needs, Params
from distcl.methods.finetune import Finetune


class JointParams(Params):
    """No weights."""


@METHODS.register()
class Joint(Finetune):
    name = "joint"
    Params = JointParams

    @classmethod
    def needs_for(cls, params) -> Needs:
        return Needs(all_data=True, head="linear")

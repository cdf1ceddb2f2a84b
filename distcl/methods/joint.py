"""joint: cross-entropy on every task's data seen so far (the upper bound).

The same loss as fine-tune; the engine streams the training shards of tasks 0..t for
task t (``Needs.all_data``).
"""

from __future__ import annotations

from distcl.catalog import JointSpec
from distcl.methods.base import METHODS
from distcl.methods.finetune import Finetune


@METHODS.register()
class Joint(JointSpec, Finetune):
    """The spec's name, Params and needs; the loss of its parent."""

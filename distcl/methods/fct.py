"""FCT (Ramanujan et al., CVPR 2022, "Forward compatible training for large-scale embedding
retrieval systems") with FastFill's uncertainty (Jaeckle et al., ICLR 2023): the new model is
trained without any compatibility term (here as ER: cross-entropy on the task's data and on
replayed exemplars), and after each task t >= 2 a transformation h_t of model t-1's rows into
model t's space is learned on the items that have both rows: the task's training data and
the memory's exemplars (``distcl.train.transform``; FastFill's loss, ``distcl.losses.
fastfill_loss``). h_t is stored with model t (``models/<t>/transform.npz``); the evaluation
engine applies it to old gallery rows as it streams them (the "transformed" matrix), and
``distcl backfill --apply --transform`` writes the transformed rows as a gallery version.
"""

from __future__ import annotations

from distcl import losses
from distcl.catalog import FCTSpec
from distcl.methods.base import METHODS, Method


@METHODS.register()
class FCT(FCTSpec, Method):
    def loss(self, batch, new, old):
        return {"ce": losses.cross_entropy(self.seen_logits(new["logits"]), batch.labels)}

"""One training step as a module: new model + method + alignment terms, old model aside.

DDP wraps this whole module so that learned parts of a method (a projection, a
discriminator) are synchronised like the backbone. The frozen old model is *not* a
submodule: it stays outside DDP, in eval mode, without gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from distcl.methods.align import build_align_terms
from distcl.methods.base import Batch, Method, TaskContext


class TrainStep(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        method: Method,
        align_cfgs,
        ctx: TaskContext,
        old_model: nn.Module | None,
    ):
        super().__init__()
        self.model = model
        self.method = method
        self.align = build_align_terms(align_cfgs, ctx)
        self.needs = method.needs()
        self.want_stages = self.needs.stages or any(t.needs_stages for t in self.align)
        if (self.needs.old_model or len(self.align)) and old_model is None and ctx.task > 0:
            raise ValueError("the method needs the previous task's model, which is missing")
        # A plain attribute, not a submodule: DDP and the optimiser never see it.
        self.__dict__["old_model"] = old_model

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        new = self.model(batch.images, return_stages=self.want_stages)
        old = None
        if self.old_model is not None:
            with torch.no_grad():
                old = self.old_model(batch.images, return_stages=self.want_stages)
        terms = dict(self.method.loss(batch, new, old))
        if old is not None:
            for term in self.align:
                terms[f"align_{term.name}"] = term.cfg.weight * term(batch, new, old)
        # Logits of the current-task rows for the train accuracy shown in progress.
        terms["_logits"] = new["logits"].detach()
        return terms

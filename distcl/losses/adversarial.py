"""Adversarial alignment: a discriminator learns old (1) vs new (0) features; the new model
learns to make its features look old.

Two ways to express it, both as loss terms the engine sums and backpropagates:

1. Gradient reversal (one term, recommended):
       logits_new = disc(grad_reverse(new_feat, scale))
       logits_old = disc(old_feat)
       d_loss = discriminator_loss(logits_new, logits_old)
       terms["adv"] = d_loss
   The discriminator descends ``d_loss``; the reversed gradient makes the new model ascend
   it, i.e. confuse the discriminator (minimax form).
2. Two terms (non-saturating GAN): ``generator_loss`` must come from logits where the
   discriminator gets no gradient (e.g. ``torch.func.functional_call`` with detached
   parameters) and ``discriminator_loss`` from logits of ``new_feat.detach()``; summing the
   two terms of a single set of logits would train each player against itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GradReverse", "discriminator_loss", "generator_loss", "grad_reverse"]


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-scale`` backward (Ganin & Lempitsky)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad_output, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x`` unchanged forward, gradient times ``-scale`` backward."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    return GradReverse.apply(x, scale)


def _check_disc_logits(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor")
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B,) or (B, 1) with B > 0, got {tuple(t.shape)}")
    return t


def discriminator_loss(
    disc_logits_new: torch.Tensor, disc_logits_old: torch.Tensor
) -> torch.Tensor:
    """``(BCE(old, 1) + BCE(new, 0)) / 2`` (each a batch mean) from discriminator logits (B,)
    or (B, 1) on new-model and old-model features. Behind ``grad_reverse`` on the new side it
    is the whole minimax game in one term."""
    new = _check_disc_logits("disc_logits_new", disc_logits_new)
    old = _check_disc_logits("disc_logits_old", disc_logits_old)
    bce = F.binary_cross_entropy_with_logits
    return 0.5 * (bce(old, torch.ones_like(old)) + bce(new, torch.zeros_like(new)))


def generator_loss(disc_logits_new: torch.Tensor) -> torch.Tensor:
    """``BCE(new, 1)``: the non-saturating loss of a new model that wants to look old (for the
    two-term form; see the module docstring for which logits it must come from)."""
    new = _check_disc_logits("disc_logits_new", disc_logits_new)
    return F.binary_cross_entropy_with_logits(new, torch.ones_like(new))

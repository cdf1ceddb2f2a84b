"""The forward-compatible transformation h: an old model's row -> the new model's space
(FCT's ``MLP_BN_SIDE_PROJECTION``, FastFill's sigma head), and its numpy export.

    h = Transformation(old_dim=64, new_dim=128, inner_dim=2048, sigma=True)
    out, log_var = h(old_rows)          # (B, 128), (B,) = log sigma^2 (None without the head)
    layers = h.export()                 # numpy: BatchNorm folded, what the engine applies

As FCT builds it: two branches (old row, side-information) of Linear -> BatchNorm -> ReLU
twice (d_old -> 2 d_old -> 2 d_new), concatenated (4 d_new), then the mixer: Linear -> BN ->
ReLU twice (inner_dim) and a plain Linear to d_new; no residual, no output normalisation.
Without side-information (FCT's default when no side model is given, FastFill's configs) the
old row feeds both branches, which is what this module does. At d = 128 and inner 2048:
5.71M parameters (FCT's size); the sigma head is Linear(d_new, 1) on h's output.

The numpy export (``export``, applied by ``distcl.eval.transforms``) folds each BatchNorm's
running statistics into the Linear before it, fuses the two branches into one wider layer and
one block-diagonal layer: the same function as ``h.eval()``, without torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["Transformation"]


def _block(d_in: int, d_out: int) -> list[nn.Module]:
    return [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]


class Transformation(nn.Module):
    def __init__(self, old_dim: int, new_dim: int, inner_dim: int = 2048,
                 sigma: bool = True) -> None:  # fmt: skip
        super().__init__()
        if min(old_dim, new_dim, inner_dim) < 1:
            raise ValueError(f"dims must be >= 1, got old {old_dim}, new {new_dim}, "
                             f"inner {inner_dim}")  # fmt: skip
        self.old_dim, self.new_dim, self.inner_dim = old_dim, new_dim, inner_dim
        self.p1 = nn.Sequential(*_block(old_dim, 2 * old_dim), *_block(2 * old_dim, 2 * new_dim))
        self.p2 = nn.Sequential(*_block(old_dim, 2 * old_dim), *_block(2 * old_dim, 2 * new_dim))
        self.mixer = nn.Sequential(
            *_block(4 * new_dim, inner_dim), *_block(inner_dim, inner_dim),
            nn.Linear(inner_dim, new_dim),
        )  # fmt: skip
        self.sigma = nn.Linear(new_dim, 1) if sigma else None

    def forward(self, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.mixer(torch.cat([self.p1(old), self.p2(old)], dim=1))
        return out, (None if self.sigma is None else self.sigma(out).squeeze(1))

    def signature(self) -> dict:
        return {"old_dim": self.old_dim, "new_dim": self.new_dim, "inner_dim": self.inner_dim,
                "sigma": self.sigma is not None}  # fmt: skip

    @torch.no_grad()
    def export(self) -> dict[str, np.ndarray]:
        """The eval-mode function as numpy arrays: ``w<k>`` (in, out) and ``b<k>`` (out,) per
        layer, ReLU after every layer but the last; ``sigma_w`` (d_new,), ``sigma_b`` ()."""

        def folded(seq: nn.Sequential, start: int) -> tuple[np.ndarray, np.ndarray]:
            lin, bn = seq[start], seq[start + 1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
            w = (lin.weight * scale[:, None]).T  # (in, out)
            b = bn.bias - bn.running_mean * scale
            return w.double().numpy(), b.double().numpy()

        a1, c1 = folded(self.p1, 0)
        a2, c2 = folded(self.p2, 0)
        b1, e1 = folded(self.p1, 3)
        b2, e2 = folded(self.p2, 3)
        top, bottom = np.zeros((b1.shape[0], b2.shape[1])), np.zeros((b2.shape[0], b1.shape[1]))
        layers = [
            (np.concatenate([a1, a2], 1), np.concatenate([c1, c2])),  # both branches' first
            (np.block([[b1, top], [bottom, b2]]), np.concatenate([e1, e2])),  # block-diagonal
            folded(self.mixer, 0),
            folded(self.mixer, 3),
            (self.mixer[6].weight.T.double().numpy(), self.mixer[6].bias.double().numpy()),
        ]
        out = {}
        for k, (w, b) in enumerate(layers):
            out[f"w{k}"], out[f"b{k}"] = w.astype(np.float32), b.astype(np.float32)
        if self.sigma is not None:
            out["sigma_w"] = self.sigma.weight[0].float().numpy()
            out["sigma_b"] = self.sigma.bias[0].float().numpy()
        return out

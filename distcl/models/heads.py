"""Classifier heads on the embedding: linear, cosine (normalised softmax), fixed d-simplex.

Pure core: imports torch only (no Ray, faiss, webdataset, file I/O).

- ``LinearHead`` / ``CosineHead``: pre-allocated for every class of the scenario (methods
  mask the classes not seen yet).
- ``FixedSimplexHead`` is CL2R's classifier: the K vertices of a regular simplex in R^(K-1),
  pre-allocated for every class of the scenario, a buffer that is never trained. Its input
  dimension must be K - 1.

All heads expose ``weight`` (C, D), ``num_classes``, ``in_dim``, and ``kind``,
and are built by name with ``build_head`` (registry ``HEADS``).

Test: ``.venv/bin/python -m pytest tests/test_models.py -q``
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distcl.registry import Registry

__all__ = [
    "HEADS",
    "CosineHead",
    "FixedSimplexHead",
    "LinearHead",
    "build_head",
    "dsimplex",
]


def dsimplex(num_classes: int) -> torch.Tensor:
    """Vertices of the regular simplex with ``num_classes`` = K = d + 1 vertices in R^d.

    Returns a float32 tensor (K, K - 1): rows have unit norm, distinct rows have inner
    product exactly -1/d (up to float32 rounding), and the rows sum to the zero vector.

    Construction (deterministic): the one-hot vertices e_1..e_K of R^K lie on the hyperplane
    sum(v) = 1; expressed in the orthonormal Helmert basis of the hyperplane sum(v) = 0,
    vertex i is column i of the Helmert matrix H (K-1, K) (centring drops out because H's
    rows are orthogonal to the all-ones vector). Its norm^2 is (K-1)/K, so we rescale.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    k = torch.arange(1, num_classes, dtype=torch.float64)[:, None]  # (K-1, 1)
    j = torch.arange(num_classes, dtype=torch.float64)[None, :]  # (1, K)
    # Helmert row k: k entries 1, then -k, then zeros; divided by sqrt(k (k + 1)).
    helmert = torch.where(j < k, 1.0, torch.where(j == k, -k, 0.0)) / torch.sqrt(k * (k + 1))
    vertices = helmert.T * math.sqrt(num_classes / (num_classes - 1))  # (K, K-1)
    return vertices.to(torch.float32).contiguous()


def _check_dims(in_dim: int, num_classes: int) -> None:
    if in_dim < 1:
        raise ValueError(f"in_dim must be >= 1, got {in_dim}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _init_rows(rows: torch.Tensor) -> None:
    # The same default as nn.Linear.
    nn.init.kaiming_uniform_(rows, a=math.sqrt(5))


class LinearHead(nn.Module):
    """Affine classifier ``logits = x @ W.T + b`` ."""

    kind = "linear"

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        _check_dims(in_dim, num_classes)
        self.in_dim = in_dim
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))  # (C, D)
        self.bias = nn.Parameter(torch.empty(num_classes))  # (C,)
        _init_rows(self.weight.data)
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.bias.data, -bound, bound)

    @property
    def num_classes(self) -> int:
        """Current number of output classes."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of features ``x`` (B, D)."""
        return F.linear(x, self.weight, self.bias)


class CosineHead(nn.Module):
    """Normalised-softmax classifier: ``logits = cos(w_c, x) / temperature`` (CVS's
    NormSoftmax, T = 0.05). Growable like ``LinearHead``."""

    kind = "cosine"

    def __init__(self, in_dim: int, num_classes: int, temperature: float = 0.05) -> None:
        super().__init__()
        _check_dims(in_dim, num_classes)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.in_dim = in_dim
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))  # (C, D)
        _init_rows(self.weight.data)

    @property
    def num_classes(self) -> int:
        """Current number of output classes."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C): cosine similarity of ``x`` (B, D) to each row, over temperature."""
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T / self.temperature


class FixedSimplexHead(nn.Module):
    """CL2R's fixed classifier: ``logits = x @ dsimplex(K).T``, with K the number of classes
    of the whole scenario. The weight is a buffer (saved, moved with ``.to``, never trained).
    ``in_dim`` (if given) must equal K - 1."""

    kind = "simplex"

    def __init__(self, num_classes_total: int, in_dim: int | None = None) -> None:
        super().__init__()
        if isinstance(num_classes_total, bool) or not isinstance(num_classes_total, int):
            raise ValueError(f"num_classes_total must be an int, got {num_classes_total!r}")
        if num_classes_total < 2:
            raise ValueError(f"num_classes_total must be >= 2, got {num_classes_total}")
        if in_dim is not None and in_dim != num_classes_total - 1:
            raise ValueError(
                f"a fixed simplex head over K={num_classes_total} classes needs "
                f"embedding_dim = K - 1 = {num_classes_total - 1}, got in_dim={in_dim}"
            )
        self.in_dim = num_classes_total - 1
        self.register_buffer("weight", dsimplex(num_classes_total))  # (K, K-1)

    @property
    def num_classes(self) -> int:
        """Number of pre-allocated classes K."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of features ``x`` (B, K-1)."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"x must have shape (B, {self.in_dim}) for a simplex head over "
                f"{self.num_classes} classes, got {tuple(x.shape)}"
            )
        return x @ self.weight.T


# kind -> factory(in_dim, num_classes, **kw)
HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
HEADS.add("linear", LinearHead)
HEADS.add("cosine", CosineHead)
HEADS.add(
    "simplex", lambda in_dim, num_classes, **kw: FixedSimplexHead(num_classes, in_dim=in_dim, **kw)
)


def build_head(kind: str, in_dim: int, num_classes: int, **kw: Any) -> nn.Module:
    """Build a registered head; ``kw`` goes to its constructor (e.g. ``temperature``)."""
    return HEADS[kind](in_dim, num_classes, **kw)

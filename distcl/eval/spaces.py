"""Rows of models with different embedding sizes, compared (``model.upgrades``,
``model.dim_change``; the training side: ``distcl.losses.dims``). Pure numpy.

    spaces = Spaces(dims={0: 64, 1: 64, 2: 128}, mode="pad")
    q2 = spaces.queries(q, new=2, old=0)        # model 2's rows (N, 128) -> comparable to model 0's
    g0 = spaces.rows(g, new=2, old=0)            # model 0's rows as the comparison needs them

For a new model's rows (queries, or a new gallery) against an old model's rows:

- ``pad``: the old rows are zero-padded: inner products are those with the new rows' first
  d_old dimensions; a smaller new row is zero-padded instead;
- ``truncate``: the larger side is cut to the smaller's size and L2-normalised again;
- ``projection``: the new rows go through the learned maps of every upgrade between the two
  models (``models/<u>/compat.npy``: P_u, (d_{u-1}, d_u)), then are L2-normalised.

Equal sizes compare as they are, whatever the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Map = Callable[[np.ndarray], np.ndarray]


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Spaces:
    dims: dict[int, int]  # model -> its embedding size
    mode: str = "pad"
    compat: dict[int, np.ndarray] = field(default_factory=dict)  # model u -> P_u

    def maps(self, new: int, old: int) -> tuple[Map | None, Map | None, int]:
        """(map of model ``new``'s rows, map of model ``old``'s rows, the size they meet in);
        None where rows stay as they are."""
        dn, do = self.dims[new], self.dims[old]
        if dn == do:
            return None, None, dn
        if self.mode == "projection":
            chain = self._chain(new, old)
            return (lambda x: _normalize(x @ chain)), None, do
        if dn > do:
            if self.mode == "truncate":
                return (lambda x: _normalize(x[:, :do])), None, do
            return (lambda x: np.ascontiguousarray(x[:, :do])), None, do
        if self.mode == "truncate":  # the old rows are the larger: cut them
            return None, (lambda x: _normalize(x[:, :dn])), dn
        return (lambda x: np.pad(x, ((0, 0), (0, do - dn)))), None, do

    def queries(self, x: np.ndarray, new: int, old: int) -> np.ndarray:
        f = self.maps(new, old)[0]
        return x if f is None else f(x)

    def rows(self, x: np.ndarray, new: int, old: int) -> np.ndarray:
        f = self.maps(new, old)[1]
        return x if f is None else f(x)

    def _chain(self, new: int, old: int) -> np.ndarray:
        """(d_new, d_old): the product of the upgrades' maps from model ``new`` back to
        ``old`` (row vectors: x @ chain)."""
        if new < old:
            raise ValueError(
                "a learned projection maps a newer model's rows into an older model's space, "
                f"not model {new + 1}'s into model {old + 1}'s"
            )
        chain = np.eye(self.dims[new], dtype=np.float32)
        for u in range(new, old, -1):
            if self.dims[u] == self.dims[u - 1]:
                continue
            if u not in self.compat:
                raise ValueError(f"model {u + 1} changed the embedding size but has no learned "
                                 "projection (models/<t>/compat.npy): was it trained with "
                                 "model.dim_change: projection?")  # fmt: skip
            chain = chain @ self.compat[u].T.astype(np.float32)  # (d_new, d_{u-1})
        return chain

"""Forward-compatible transformations of stored rows (method ``fct``), applied without torch.

    hs = load_transforms(run_dir)                # model u -> h_u (model u-1's rows -> u's space)
    f = chain(hs, old=0, new=2)                  # h_2(h_1(rows)), rows of model 0 -> model 2
    rows2 = f(rows0)                             # (N, d_2), L2-normalised
    sigma = hs[2].log_var(rows1)                 # (N,) FastFill's uncertainty, log sigma^2

``models/<u>/transform.npz`` is written by the training engine after task u
(``distcl.train.transform``; the layers are ``distcl.models.transform.Transformation.export``:
BatchNorm folded, ReLU between layers). A row goes in as stored (unit norm) and comes out
L2-normalised, the form every stored row has; a chain normalises after each step, as each h
was trained on stored rows. Rows are transformed in blocks of ``BLOCK`` rows, so memory stays
at a block's activations (BLOCK x inner_dim floats) whatever the number of rows.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distcl import storage

BLOCK = 8192


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Transform:
    """One h: ``layers`` [(W (in, out), b (out,))], ReLU after all but the last; the sigma
    head (w (d_new,), b) or None."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    sigma: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_arrays(cls, arrays) -> Transform:
        n = sum(1 for k in arrays if k.startswith("w"))
        layers = tuple((np.asarray(arrays[f"w{k}"], np.float32),
                        np.asarray(arrays[f"b{k}"], np.float32)) for k in range(n))  # fmt: skip
        sigma = None
        if "sigma_w" in arrays:
            sigma = (np.asarray(arrays["sigma_w"], np.float32), np.float32(arrays["sigma_b"]))
        return cls(layers, sigma)

    @property
    def old_dim(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def new_dim(self) -> int:
        return self.layers[-1][0].shape[1]

    def raw(self, x: np.ndarray) -> np.ndarray:
        """h(x) (B, d_new) as trained (not normalised), for one block of rows."""
        for k, (w, b) in enumerate(self.layers):
            x = x @ w
            x += b
            if k + 1 < len(self.layers):
                np.maximum(x, 0, out=x)
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Rows (N, d_old) -> their transformed rows (N, d_new), L2-normalised."""
        if x.shape[1] != self.old_dim:
            raise ValueError(f"rows of size {x.shape[1]}; this transformation maps rows of size "
                             f"{self.old_dim}")  # fmt: skip
        out = np.empty((len(x), self.new_dim), np.float32)
        for s in range(0, len(x), BLOCK):
            out[s : s + BLOCK] = _normalize(self.raw(np.asarray(x[s : s + BLOCK], np.float32)))
        return out

    def log_var(self, x: np.ndarray) -> np.ndarray:
        """(N,) FastFill's predicted log sigma^2 of each row (largest: backfilled first)."""
        if self.sigma is None:
            raise ValueError("this transformation has no sigma head (method fct, sigma: false)")
        w, b = self.sigma
        out = np.empty(len(x), np.float32)
        for s in range(0, len(x), BLOCK):
            out[s : s + BLOCK] = self.raw(np.asarray(x[s : s + BLOCK], np.float32)) @ w + b
        return out


def load_transforms(run_dir, models=None) -> dict[int, Transform]:
    """model u -> its h (``models/<u>/transform.npz``) for the models that have one."""
    from distcl.rundir import RunDir

    rd = RunDir(run_dir)
    out = {}
    for u in models if models is not None else range(1, rd.finished_tasks()):
        path = rd.model(u) / "transform.npz"
        if storage.is_file(path):
            with np.load(io.BytesIO(storage.read_bytes(path))) as z:
                out[u] = Transform.from_arrays(z)
    return out


def chain(
    transforms: dict[int, Transform], old: int, new: int
) -> Callable[[np.ndarray], np.ndarray]:
    """Model ``old``'s rows -> model ``new``'s space: h_new(... h_{old+1}(rows)); each h_u
    maps model u-1's rows. ValueError naming the missing one."""
    if not old < new:
        raise ValueError(f"a transformation maps an older model's rows forward, not model "
                         f"{old + 1}'s into model {new + 1}'s")  # fmt: skip
    missing = [u for u in range(old + 1, new + 1) if u not in transforms]
    if missing:
        raise ValueError(f"model {missing[0] + 1} has no transformation (models/{missing[0]}/"
                         "transform.npz): was the run trained with method fct?")  # fmt: skip
    steps = [transforms[u] for u in range(old + 1, new + 1)]

    def apply(rows: np.ndarray) -> np.ndarray:
        for h in steps:
            rows = h(rows)
        return rows

    return apply


def has_chain(transforms: dict[int, Transform], old: int, new: int) -> bool:
    return old < new and all(u in transforms for u in range(old + 1, new + 1))

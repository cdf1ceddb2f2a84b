"""Embeddings of two sizes in one space (``model.dim_change``), for the losses that compare a
new model's outputs with an old model's after an upgrade changed the embedding size.

    new2, old2 = common_space(new, old, "pad")      # (B, d_new), (B, d_old) -> one size

- ``pad``: the smaller side is zero-padded (BT^2, SLERP). A larger new embedding is compared
  through its first d_old dimensions (inner products with a zero-padded old row are exactly
  those; its extra dimensions are free to carry what the old model lacks); a smaller one is
  padded with zeros.
- ``truncate``: the larger side is cut to the smaller's size; with ``renormalize`` (unit
  embeddings) it is L2-normalised again (OCA).
- ``projection``: not here: a learned map of the new features into the old space
  (``EmbeddingModel.compat``), which the caller passes as the new side.

Pure: tensors in, tensors out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("pad", "truncate", "projection")


def common_space(
    new: torch.Tensor, old: torch.Tensor, mode: str = "pad", renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new`` (B, d_new) and ``old`` (N, d_old) in one space: see the module docstring.
    Equal sizes pass through unchanged, whatever the mode."""
    d_new, d_old = new.shape[-1], old.shape[-1]
    if d_new == d_old:
        return new, old
    if mode not in ("pad", "truncate"):
        raise ValueError(f"model.dim_change: {mode!r} needs the new model's projection")
    norm = (lambda t: F.normalize(t, dim=-1)) if renormalize else (lambda t: t)
    if d_new > d_old:
        head = new[..., :d_old]
        return (norm(head) if mode == "truncate" else head), old
    if mode == "pad":
        return F.pad(new, (0, d_old - d_new)), old
    return new, norm(old[..., :d_new])


def common_dim(d_new: int, d_old: int, mode: str) -> int:
    """The size of the space :func:`common_space` (or the projection) compares in."""
    return min(d_new, d_old) if mode == "truncate" else d_old

"""The embedding model: normalise input -> backbone -> (projection) -> embedding -> head.

    model = EmbeddingModel("resnet32", in_channels=1, embedding_dim=64, head="cosine",
                           num_classes=10)
    out = model(images)               # images: float (B, C, H, W) in [0, 1]
    out["feat"]    # (B, D) unnormalised embedding (the head's input)
    out["emb"]     # (B, D) L2-normalised embedding (what retrieval uses)
    out["logits"]  # (B, C)
    model.embed(images)               # == out["emb"], without the head

Per-channel mean/std are buffers, so a checkpoint carries its own input normalisation.
A linear embedding layer ``Linear(F, D)`` always follows the backbone (signed embeddings).

``model_signature`` / ``load_state_checked`` refuse a checkpoint of another architecture
with an error that names the mismatching field.

Test: ``.venv/bin/python -m pytest tests/test_models.py -q``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distcl.models.backbones import build_backbone
from distcl.models.heads import build_head

__all__ = ["EmbeddingModel", "load_state_checked", "model_signature"]

# ImageNet statistics for RGB; a neutral 0.5/0.5 otherwise (pass mean/std for a dataset).
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)


class EmbeddingModel(nn.Module):
    """Backbone + optional projection to ``embedding_dim`` + head on the embedding.

    ``mean`` / ``std`` (per channel, for inputs in [0, 1]) default to ImageNet's for 3
    channels and 0.5 / 0.5 otherwise. The head sees the unnormalised embedding ``feat``.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        embedding_dim: int,
        head: str,
        num_classes: int,
        small_input: bool = True,
        head_kwargs: Mapping[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        compat_dim: int | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.backbone_name = backbone
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.head_kind = head
        self.small_input = bool(small_input)

        self.backbone, feature_dim = build_backbone(backbone, in_channels, small_input)
        # Always a linear embedding layer: pooled post-ReLU features are non-negative, and
        # the d-simplex and cosine heads need embeddings that can point anywhere.
        self.projection = nn.Linear(feature_dim, embedding_dim)
        self.head = build_head(head, embedding_dim, num_classes, **dict(head_kwargs or {}))
        # ``model.dim_change: projection`` after a change of embedding size: a learned map of
        # this model's features into the previous model's space (its ``feat_compat``).
        # Started as the identity on the shared dimensions (zero-padding, then learned).
        self.compat_dim = compat_dim
        self.compat = None
        if compat_dim is not None:
            self.compat = nn.Linear(embedding_dim, compat_dim, bias=False)
            with torch.no_grad():
                self.compat.weight.copy_(torch.eye(compat_dim, embedding_dim))

        if mean is None:
            mean = _RGB_MEAN if in_channels == 3 else (0.5,) * in_channels
        if std is None:
            std = _RGB_STD if in_channels == 3 else (0.5,) * in_channels
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean and std need {in_channels} values (in_channels), "
                f"got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {tuple(std)}")
        self.register_buffer(
            "input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_classes(self) -> int:
        """Current number of head outputs."""
        return self.head.num_classes

    def _features(self, x: torch.Tensor, return_stages: bool):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a float image in [0, 1], got dtype {x.dtype}")
        x = (x - self.input_mean) / self.input_std
        stages = None
        if return_stages:
            pooled, stages = self.backbone(x, return_stages=True)
        else:
            pooled = self.backbone(x)  # (B, F)
        feat = self.projection(pooled)  # (B, D)
        return feat, stages

    def forward(self, x: torch.Tensor, return_stages: bool = False) -> dict[str, Any]:
        """Return ``dict(feat, emb, logits)`` (+ ``stages`` when ``return_stages``)."""
        feat, stages = self._features(x, return_stages)
        out: dict[str, Any] = {
            "feat": feat,
            "emb": F.normalize(feat.float(), dim=1),  # (B, D), unit norm, float32 (autocast)
            "logits": self.head(feat),  # (B, C)
        }
        if self.compat is not None:
            out["feat_compat"] = self.compat(feat)  # (B, compat_dim): the previous space
        if return_stages:
            out["stages"] = stages
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding (B, D), float32 also under autocast; skips the head."""
        feat, _ = self._features(x, return_stages=False)
        return F.normalize(feat.float(), dim=1)


def model_signature(model: EmbeddingModel) -> dict[str, Any]:
    """What fixes the architecture: store it beside a checkpoint, compare before loading.
    ``num_classes`` is the head's current size (grow the head before loading a later task)."""
    sig = {
        "backbone": model.backbone_name,
        "in_channels": model.in_channels,
        "small_input": model.small_input,
        "embedding_dim": model.embedding_dim,
        "head": model.head_kind,
        "num_classes": model.num_classes,
    }
    if getattr(model, "compat_dim", None) is not None:  # only then: older signatures stay valid
        sig["compat_dim"] = model.compat_dim
    return sig


def load_state_checked(
    model: EmbeddingModel, state: Mapping[str, torch.Tensor], signature_saved: Mapping[str, Any]
) -> EmbeddingModel:
    """Load ``state`` into ``model`` after checking ``signature_saved`` matches the model.

    Raises ValueError naming the first mismatching field, e.g.
    ``checkpoint embedding_dim=64 but job says 128``. A ``module.`` prefix (DDP) on every
    key is stripped. Loading is strict. Returns the model.
    """
    current = model_signature(model)
    for field in signature_saved.keys() - current.keys():
        raise ValueError(f"checkpoint {field}={signature_saved[field]} but job says none")
    for field, value in current.items():
        if field not in signature_saved:
            raise ValueError(f"checkpoint signature has no field {field!r}")
        saved = signature_saved[field]
        if saved != value:
            hint = " (grow the head before loading)" if field == "num_classes" else ""
            raise ValueError(f"checkpoint {field}={saved} but job says {value}{hint}")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    model.load_state_dict(state, strict=True)
    return model

"""Numeric precision of training and of the end-of-task embedding passes (``train.precision``).

    fp32   no autocast: every result bitwise what it is without this module (the CPU default)
    bf16   ``torch.autocast(dtype=bfloat16)``: the GPU default where the GPU supports it
           (Ampere and newer); on a CPU it runs too (oneDNN), within the tolerance that
           tests/test_precision.py states, usually slower than fp32
    fp16   ``torch.autocast(dtype=float16)`` with a gradient scaler (dynamic loss scaling),
           for GPUs without bf16 (iamcl2r trains HOC this way)
    auto   bf16 on a CUDA device that supports it, fp16 on an older one, fp32 elsewhere

Parameters, optimiser state and the stored embeddings stay float32: autocast runs the matmuls
and convolutions in the low precision, and embeddings are normalised and written as float32.
On a GPU the model and its inputs also use the channels-last memory layout (faster
convolutions with tensor cores); on a CPU the layout stays as it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (``fp32``, ``bf16`` or ``fp16``) on one device type."""

    name: str
    device_type: str  # "cpu", "cuda", ...

    @property
    def channels_last(self) -> bool:
        """Channels-last layout for the convolutions (GPUs only)."""
        return self.device_type == "cuda"

    def autocast(self):
        """The context the forward passes (new and old model, loss terms) run in."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    def scaler(self):
        """A gradient scaler for fp16 (small gradients underflow in float16), else None."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images (B, C, H, W) in the layout the model runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in the layout it runs in (in place, as ``Module.to``)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module


def resolve_precision(setting: str, device: torch.device | str) -> Precision:
    """``train.precision`` on ``device``: ``auto`` picks bf16 / fp16 / fp32 (module doc); an
    explicit low precision the device cannot run is a ValueError naming the field."""
    device = torch.device(device)
    kind = device.type
    if setting == "auto":
        if kind != "cuda":
            return Precision("fp32", kind)
        return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16", kind)
    if setting not in ("fp32", *DTYPES):
        raise ValueError(f"train.precision: {setting!r} is not one of auto, fp32, bf16, fp16")
    if setting == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"train.precision: bf16, but {torch.cuda.get_device_name(device)} has no bf16 "
            "support; use fp16 (or auto)"
        )
    return Precision(setting, kind)

"""Convolutional backbones: CIFAR-style ResNet-32 and torchvision ResNet-18/50.

Every backbone maps images (B, C, H, W) to pooled features (B, F) and can also return the
output of each residual stage, for layer-wise alignment between an old and a new model:

    feats = backbone(x)                                  # (B, F)
    feats, stages = backbone(x, return_stages=True)      # stages: list of (B, C_s, H_s, W_s)

Backbones are built by name from a tiny registry (``BACKBONES``, ``build_backbone``), which
the tests parametrise over. Nothing is downloaded: torchvision models use ``weights=None``.

Test: ``.venv/bin/python -m pytest tests/test_models.py -q``
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from distcl.registry import Registry

__all__ = [
    "BACKBONES",
    "Backbone",
    "CifarResNet",
    "TorchvisionResNet",
    "build_backbone",
    "resnet32",
    "torchvision_resnet",
]


class Backbone(nn.Module):
    """Base class: subclasses set ``feature_dim`` / ``stage_channels`` and implement
    ``forward_stages(x) -> (feats (B, F), [stage outputs])``."""

    feature_dim: int
    stage_channels: tuple[int, ...]

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return pooled features (B, F) and the output of every residual stage."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled features (B, F), or ``(feats, stages)`` when ``return_stages``."""
        # Stage outputs are kept for backprop anyway, so returning them costs nothing.
        feats, stages = self.forward_stages(x)
        return (feats, stages) if return_stages else feats


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """A ResNet for small images (He et al. 2016, CIFAR variant, 6n + 2 layers): a 3x3 stem,
    then 3 stages of n BasicBlocks with 16/32/64 channels (strides 1/2/2), global average
    pooling; n = 5 is ResNet-32 (``CIFAR_RESNETS``). Works for any input of at least 8x8
    pixels (28x28 -> 7x7, 32x32 -> 8x8 at the last stage).
    """

    def __init__(self, in_channels: int = 1, blocks_per_stage: int = 5) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        widths = (16, 32, 64)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(_BasicBlock(in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.feature_dim = widths[-1]
        self.stage_channels = widths
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return pooled features (B, 64) and the 3 stage outputs."""
        h = self.stem(x)  # (B, 16, H, W)
        stages = []
        for stage in self.stages:
            h = stage(h)
            stages.append(h)
        feats = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # (B, 64)
        return feats, stages


class TorchvisionResNet(Backbone):
    """A torchvision ResNet (random init) without its fc layer; the 4 ``layerN`` outputs are
    the stages. ``small_input`` swaps the 7x7/2 stem + maxpool for a 3x3/1 conv (28-32 px)."""

    def __init__(self, name: str = "resnet18", in_channels: int = 3, small_input: bool = False):
        super().__init__()
        import torchvision  # imported here so heads/losses never pay for it

        builders = {
            "resnet18": torchvision.models.resnet18,
            "resnet50": torchvision.models.resnet50,
        }
        if name not in builders:
            raise ValueError(f"name must be one of {sorted(builders)}, got {name!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        net = builders[name](weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if isinstance(net.conv1, nn.Conv2d):
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = net.fc.in_features  # 512 (resnet18) or 2048 (resnet50)
        net.fc = nn.Identity()
        self.net = net
        # The last BatchNorm of a stage's last block has the stage width (bn3 in Bottleneck).
        self.stage_channels = tuple(
            getattr(layer[-1], "bn3", layer[-1].bn2).num_features
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
        )

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return pooled features (B, F) and the 4 stage outputs."""
        n = self.net
        h = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        stages = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            h = layer(h)
            stages.append(h)
        feats = torch.flatten(n.avgpool(h), 1)  # (B, F)
        return feats, stages


def resnet32(in_channels: int = 1) -> CifarResNet:
    """CIFAR-style ResNet-32 (feature_dim 64) for 28x28 / 32x32 images."""
    return CifarResNet(in_channels=in_channels)


#: The CIFAR ResNet family (He et al. 2016, 6n + 2 layers): n BasicBlocks per stage.
CIFAR_RESNETS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet56": 9}


def torchvision_resnet(
    name: str = "resnet18", in_channels: int = 3, small_input: bool = False
) -> TorchvisionResNet:
    """torchvision ``resnet18`` / ``resnet50`` with ``weights=None`` and no fc layer."""
    return TorchvisionResNet(name=name, in_channels=in_channels, small_input=small_input)


# name -> factory(in_channels, small_input). The CIFAR ResNets' stem is always the small-image
# one, so they ignore small_input.
BACKBONES: Registry[Callable[[int, bool], Backbone]] = Registry("backbone")
for _name, _n in CIFAR_RESNETS.items():  # small-image stems always: small_input is ignored
    BACKBONES.add(_name, lambda in_channels, small_input, n=_n: CifarResNet(in_channels, n))
for _name in ("resnet18", "resnet50"):
    BACKBONES.add(_name, partial(torchvision_resnet, _name))


def build_backbone(name: str, in_channels: int, small_input: bool) -> tuple[Backbone, int]:
    """Build a registered backbone; return ``(module, feature_dim)``."""
    module = BACKBONES[name](in_channels, small_input)
    return module, module.feature_dim

"""Building blocks the model families share: a conv-BN-ReLU stage and counting parameters."""

from __future__ import annotations

from torch import nn


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    """A 3×3 convolution (no bias: the BatchNorm has one), BatchNorm and ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Layers shared by the backbones and necks."""
from __future__ import annotations

import math

import torch
from torch import nn

# YOLOv5's BatchNorm settings; they also suit YOLOv4-tiny trained with small batches.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> activation; `padding` defaults to 'same' for odd kernels."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1,
                 act: nn.Module | None = None, padding: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride,
                              kernel_size // 2 if padding is None else padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.activation = act if act is not None else nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn(self.conv(x)))


def init_detection_bias(head: nn.Conv2d, num_anchors: int, num_classes: int, stride: int,
                        image_size: int = 640) -> None:
    """Start objectness near 8 objects per image and classes near uniform (the YOLOv5 prior).

    From scratch this keeps the first steps from being dominated by the flood of negatives.
    """
    with torch.no_grad():
        bias = head.bias.view(num_anchors, -1)
        bias[:, 4] += math.log(8 / (image_size / stride) ** 2)
        bias[:, 5:] += math.log(0.6 / max(num_classes - 0.99, 0.01))


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every ConvBNAct's BatchNorm into its conv (inference only: the result no longer trains BN)."""
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.conv, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True).to(conv.weight.device, conv.weight.dtype)
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
            module.conv, module.bn = fused, nn.Identity()
    return model

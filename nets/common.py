"""Layers shared by the backbones and necks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# YOLOv5's BatchNorm settings; they also suit YOLOv4-tiny trained with small batches.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


PADDED_IMAGE_CHANNELS = 8      # cuDNN's tensor-core convolutions want input channels in multiples of 8
PADDED_ON = ("cuda",)          # device types whose image convolutions pad (tests add "cpu")


class ImageConv2d(nn.Conv2d):
    """A first convolution, on RGB images. On CUDA the input and the weight get zero channels up to 8: the same
    sums, but cuDNN then runs its tensor-core kernels instead of a generic 3-channel one. Measured on an H200
    (bench/RESULTS.md): YOLOv5n's 6x6 stem +2.9 % a training step, YOLOv4-tiny's 3x3 stem -0.9 %, so only
    YOLOv5's stem uses it. Parameters and state dict are nn.Conv2d's; an ONNX export keeps the plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = PADDED_IMAGE_CHANNELS - x.shape[1]
        if x.device.type not in PADDED_ON or extra <= 0 or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        x = F.pad(x, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)   # B,8,H,W
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, extra))                                     # O,8,k,k
        return self._conv_forward(x, weight.contiguous(memory_format=torch.channels_last), self.bias)


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> activation; `padding` defaults to 'same' for odd kernels; `conv` the
    convolution's class (ImageConv2d for a stem on images)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1,
                 act: nn.Module | None = None, padding: int | None = None, conv: type[nn.Conv2d] = nn.Conv2d):
        super().__init__()
        self.conv = conv(c_in, c_out, kernel_size, stride, kernel_size // 2 if padding is None else padding,
                         bias=False)
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

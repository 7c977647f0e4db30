"""CSPDarknet53-tiny, the backbone of Darknet's yolov4-tiny.cfg.

Module names match the widely used PyTorch port of the tutorials, so their state dicts
load by key and shape (train.py --weights).
"""
from __future__ import annotations

import torch
from torch import nn

from nets.common import ConvBNAct


def basic_conv(c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> ConvBNAct:
    """Darknet's convolutional layer: conv, BN, LeakyReLU(0.1)."""
    return ConvBNAct(c_in, c_out, kernel_size, stride, act=nn.LeakyReLU(0.1, inplace=True))


class ResblockBody(nn.Module):
    """CSP block of yolov4-tiny: a 3x3 conv, a half-channel route with two 3x3 convs, concat, 2x2 max pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.conv1 = basic_conv(in_channels, out_channels, 3)
        self.conv2 = basic_conv(half, half, 3)
        self.conv3 = basic_conv(half, half, 3)
        self.conv4 = basic_conv(out_channels, out_channels, 1)
        self.maxpool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # e.g. 104,104,64 -> 104,104,64
        x = self.conv1(x)
        route = x
        # the second half of the channels goes through the inner route: 104,104,32
        x = self.conv2(x.chunk(2, dim=1)[1])
        route1 = x
        x = self.conv3(x)
        # 104,104,32 + 104,104,32 -> 104,104,64
        feat = self.conv4(torch.cat([x, route1], dim=1))
        # 104,104,64 + 104,104,64 -> 104,104,128 -> 52,52,128
        x = self.maxpool(torch.cat([route, feat], dim=1))
        return x, feat


class CSPDarknet53Tiny(nn.Module):
    """Backbone: 416,416,3 -> feat1 26,26,256 and feat2 13,13,512."""

    out_channels = (256, 512)

    def __init__(self):
        super().__init__()
        self.conv1 = basic_conv(3, 32, 3, stride=2)
        self.conv2 = basic_conv(32, 64, 3, stride=2)
        self.resblock_body1 = ResblockBody(64, 64)
        self.resblock_body2 = ResblockBody(128, 128)
        self.resblock_body3 = ResblockBody(256, 256)
        self.conv3 = basic_conv(512, 512, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 416,416,3 -> 208,208,32 -> 104,104,64
        x = self.conv2(self.conv1(x))
        # 104,104,64 -> 52,52,128 -> 26,26,256
        x, _ = self.resblock_body1(x)
        x, _ = self.resblock_body2(x)
        # 26,26,256 -> 13,13,512, with feat1 = 26,26,256 taken before the pool
        x, feat1 = self.resblock_body3(x)
        # 13,13,512 -> 13,13,512
        feat2 = self.conv3(x)
        return feat1, feat2

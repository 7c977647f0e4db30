"""CSPDarknet of YOLOv5 v6/v7 (P5): 6x6 stride-2 stem, C3 blocks, SPPF, SiLU; widths and depths scaled."""
from __future__ import annotations

import math

import torch
from torch import nn

from nets.common import ConvBNAct, ImageConv2d


def scale_width(channels: int, width_multiple: float) -> int:
    """Channels times the width multiple, rounded up to a multiple of 8."""
    return math.ceil(channels * width_multiple / 8) * 8


def scale_depth(repeats: int, depth_multiple: float) -> int:
    """Block repeats times the depth multiple, at least 1."""
    return max(round(repeats * depth_multiple), 1)


class Bottleneck(nn.Module):
    """1x1 conv, 3x3 conv, plus the input when shapes allow and `shortcut` is set."""

    def __init__(self, c_in: int, c_out: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c_in, c_out, 1)
        self.cv2 = ConvBNAct(c_out, c_out, 3)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: half the channels through n bottlenecks, half straight, then fused."""

    def __init__(self, c_in: int, c_out: int, repeats: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = c_out // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.cv2 = ConvBNAct(c_in, hidden, 1)
        self.cv3 = ConvBNAct(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(repeats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # e.g. 52,52,128 -> (52,52,64 through the bottlenecks) + 52,52,64 -> 52,52,128
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools concatenated with their input."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1)
        self.cv2 = ConvBNAct(hidden * 4, c_out, 1)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], dim=1))


class CSPDarknet(nn.Module):
    """Backbone: 640,640,3 -> P3 80,80,256w, P4 40,40,512w, P5 20,20,1024w (w = width multiple)."""

    def __init__(self, depth_multiple: float, width_multiple: float):
        super().__init__()
        w = lambda c: scale_width(c, width_multiple)   # noqa: E731
        d = lambda n: scale_depth(n, depth_multiple)   # noqa: E731
        self.out_channels = (w(256), w(512), w(1024))
        self.stem = ConvBNAct(3, w(64), 6, 2, padding=2, conv=ImageConv2d)
        self.dark2 = nn.Sequential(ConvBNAct(w(64), w(128), 3, 2), C3(w(128), w(128), d(3)))
        self.dark3 = nn.Sequential(ConvBNAct(w(128), w(256), 3, 2), C3(w(256), w(256), d(6)))
        self.dark4 = nn.Sequential(ConvBNAct(w(256), w(512), 3, 2), C3(w(512), w(512), d(9)))
        self.dark5 = nn.Sequential(ConvBNAct(w(512), w(1024), 3, 2), C3(w(1024), w(1024), d(3)),
                                   SPPF(w(1024), w(1024)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # 640,640,3 -> 320,320,64w -> 160,160,128w
        x = self.dark2(self.stem(x))
        # -> 80,80,256w (P3) -> 40,40,512w (P4) -> 20,20,1024w (P5)
        p3 = self.dark3(x)
        p4 = self.dark4(p3)
        p5 = self.dark5(p4)
        return p3, p4, p5

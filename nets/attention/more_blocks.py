"""The published attention blocks phi 5-9 (Shuffle Attention, SGE, BAM, Polarized Self-Attention, GAM),
registered in phi order after phi 1-4 (nets/attention/blocks.py, whose conventions they follow: paper's
official code, float32 attention maps under autocast, `explain(x)`, `start_near_identity`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nets.attention.blocks import NEAR_IDENTITY_GATE, BatchNormSingle1d, _no_autocast, _set_gate  # phi 1-4 first
from nets.attention.registry import register_attention


def _divisor_groups(channels: int, groups: int, factor: int) -> int:
    """Largest group count <= `groups` such that factor*groups divides `channels`."""
    while groups > 1 and channels % (factor * groups):
        groups -= 1
    return groups


@register_attention("sa", "shuffle")
class ShuffleAttention(nn.Module):
    """Shuffle Attention (Zhang & Yang, 2021): per group, a channel half and a spatial (GroupNorm) half, then shuffle."""

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        self.groups = _divisor_groups(channels, groups, 2)
        sub = channels // (2 * self.groups)
        self.cweight = nn.Parameter(torch.zeros(1, sub, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, sub, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, sub, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, sub, 1, 1))
        self.gn = nn.GroupNorm(sub, sub)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grouped halves x_c, x_s [B*G,C/2G,H,W] and their gates: channel [B*G,C/2G,1,1], spatial like x_s."""
        b, c, h, w = x.shape
        x_c, x_s = x.reshape(b * self.groups, c // self.groups, h, w).chunk(2, dim=1)
        channel = torch.sigmoid(self.cweight * x_c.mean((2, 3), keepdim=True) + self.cbias)
        spatial = torch.sigmoid(self.sweight * self.gn(x_s) + self.sbias)
        return x_c, x_s, channel, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_c, x_s, channel, spatial = self.gates(x)            # each b*g, c/2g, ...
        out = torch.cat([x_c * channel, x_s * spatial], dim=1).reshape(b, c, h, w)
        # channel shuffle with 2 groups: b,2,c/2,h,w -> b,c/2,2,h,w
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel half's gates [B,C/2,1,1] and the spatial half's responses [B,C/2,H,W], groups side by side."""
        b = x.shape[0]
        _, _, channel, spatial = self.gates(x)
        return {"channel gate": channel.reshape(b, -1, 1, 1), "spatial gate": spatial.reshape(b, -1, *x.shape[2:])}

    def start_near_identity(self) -> None:
        """Both halves' gates start at NEAR_IDENTITY_GATE (the paper's init: weights 0, biases 1, so 0.73).

        The channel shuffle still permutes channels: the block is near identity up to that order.
        """
        for bias in (self.cbias, self.sbias):
            nn.init.constant_(bias, math.log(NEAR_IDENTITY_GATE / (1 - NEAR_IDENTITY_GATE)))


@register_attention("sge")
class SGE(nn.Module):
    """Spatial Group-wise Enhance (Li et al., 2019): per group, similarity to the group's mean vector, normalised."""

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        self.groups = _divisor_groups(channels, groups, 1)
        self.weight = nn.Parameter(torch.zeros(1, self.groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, self.groups, 1, 1))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Each group's spatial gate [B*G,1,H,W] (float32)."""
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        with _no_autocast(x):
            gf = g.float()
            t = (gf * gf.mean((2, 3), keepdim=True)).sum(1)  # b*g,h,w
            t = t.reshape(b * self.groups, h * w)
            # a 1x1 map has no spread: its std would be 0/0 with the unbiased estimate
            std = t.std(1, keepdim=True, correction=1 if h * w > 1 else 0)
            t = (t - t.mean(1, keepdim=True)) / (std + 1e-5)
            t = t.reshape(b, self.groups, h, w) * self.weight + self.bias
            return torch.sigmoid(t).reshape(b * self.groups, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        return (g * self.gate(x).to(g.dtype)).reshape(b, c, h, w)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each group's spatial gate [B,G,H,W]."""
        return {"spatial gate": self.gate(x).reshape(x.shape[0], self.groups, *x.shape[2:])}

    def start_near_identity(self) -> None:
        """The gate starts at NEAR_IDENTITY_GATE (the paper's init: weight 0, bias 1, so 0.73)."""
        nn.init.constant_(self.bias, math.log(NEAR_IDENTITY_GATE / (1 - NEAR_IDENTITY_GATE)))


@register_attention("bam")
class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., 2018): x * (1 + sigmoid(Mc + Ms)).

    The official code multiplies the two gates; the paper (eq. 1) sums them. We follow the paper.
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        mid = max(1, channels // reduction)
        self.channel_gate = nn.Sequential(
            nn.Linear(channels, mid), BatchNormSingle1d(mid), nn.ReLU(inplace=True), nn.Linear(mid, channels)
        )
        layers: list[nn.Module] = [nn.Conv2d(channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(mid),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(mid, 1, 1))
        self.spatial_gate = nn.Sequential(*layers)

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel branch Mc [B,C,1,1] and the spatial branch Ms [B,1,H,W], before their sigmoid."""
        return self.channel_gate(x.mean((2, 3)))[:, :, None, None], self.spatial_gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc, ms = self.branches(x)
        return x * (1 + torch.sigmoid(mc + ms))

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both branches (logits) and the combined gate sigmoid(Mc + Ms) [B,C,H,W]."""
        mc, ms = self.branches(x)
        return {"channel branch": mc, "spatial branch": ms, "gate": torch.sigmoid(mc + ms)}

    def start_near_identity(self) -> None:
        """1 + sigmoid(Mc + Ms) starts at 1 / NEAR_IDENTITY_GATE (about 1.05 instead of 1.5)."""
        _set_gate(self.channel_gate[3], 1 / NEAR_IDENTITY_GATE - 1)
        _set_gate(self.spatial_gate[-1], 0.5)       # logit 0: the channel gate alone sets the sum


@register_attention("psa")
class PolarizedSelfAttention(nn.Module):
    """Polarized Self-Attention, parallel layout (Liu et al., 2021), as the authors' PSA_p code.

    That code has no LayerNorm in the channel branch (the paper's figure has one) and applies the
    spatial softmax after the query-value product; both follow the official code.
    """

    def __init__(self, channels: int):
        super().__init__()
        inter = channels // 2
        self.ch_value = nn.Conv2d(channels, inter, 1, bias=False)
        self.ch_query = nn.Conv2d(channels, 1, 1, bias=False)
        self.ch_up = nn.Conv2d(inter, channels, 1, bias=False)
        self.sp_query = nn.Conv2d(channels, inter, 1, bias=False)
        self.sp_value = nn.Conv2d(channels, inter, 1, bias=False)
        for conv in (self.ch_value, self.ch_query, self.sp_query, self.sp_value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel-only gate [B,C,1,1] and the spatial-only gate [B,1,H,W]."""
        b, c, h, w = x.shape
        # projections run in the network's precision; softmax and products in float32
        value = self.ch_value(x).flatten(2).float()                                 # b,c/2,hw
        query = self.ch_query(x).flatten(2).float()                                 # b,1,hw
        sp_query = self.sp_query(x).mean((2, 3)).unsqueeze(1).float()               # b,1,c/2
        sp_value = self.sp_value(x).flatten(2).float()                              # b,c/2,hw
        with _no_autocast(x):
            # channel-only branch: b,c/2,hw @ softmax_hw(b,hw,1) -> b,c/2,1,1
            context = torch.bmm(value, torch.softmax(query, dim=-1).transpose(1, 2)).unsqueeze(-1)
            # spatial-only branch: b,1,c/2 @ b,c/2,hw -> softmax over hw -> b,1,h,w
            spatial = torch.softmax(torch.bmm(sp_query, sp_value), dim=-1).reshape(b, 1, h, w)
        channel_gate = torch.sigmoid(self.ch_up(context.to(x.dtype)))              # b,c,1,1
        return channel_gate, torch.sigmoid(spatial).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_gate, spatial_gate = self.gates(x)
        return x * channel_gate + x * spatial_gate

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two parallel gates."""
        channel_gate, spatial_gate = self.gates(x)
        return {"channel gate": channel_gate, "spatial gate": spatial_gate}

    def start_near_identity(self) -> None:
        """The channel gate starts at 0.5, so x * 0.5 + x * sigmoid(softmax) ~= x (the softmax starts near 1/hw)."""
        nn.init.zeros_(self.ch_up.weight)


@register_attention("gam")
class GAM(nn.Module):
    """Global Attention Mechanism (Liu et al., 2021), rate 4: per-pixel channel MLP gate, then 7x7 conv spatial gate.

    Heavy: at the YOLOv4-tiny points (256, 512, 128 channels) it adds 8,606,080 parameters,
    more than the whole phi-0 detector (5,918,006 at 20 classes).
    """

    def __init__(self, channels: int, rate: int = 4):
        super().__init__()
        mid = max(1, channels // rate)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, mid), nn.ReLU(inplace=True), nn.Linear(mid, channels))
        self.spatial = nn.Sequential(
            nn.Conv2d(channels, mid, 7, padding=3), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 7, padding=3), nn.BatchNorm2d(channels),
        )

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        # channel gate on every pixel: b,c,h,w -> b,h,w,c -> MLP -> b,c,h,w
        return torch.sigmoid(self.channel_mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(x)
        return x * torch.sigmoid(self.spatial(x))

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-pixel channel gate and the spatial gate on the channel-gated input, both [B,C,H,W]."""
        channel = self.channel_gate(x)
        return {"channel gate": channel, "spatial gate": torch.sigmoid(self.spatial(x * channel))}

    def start_near_identity(self) -> None:
        """Both gates start constant, their product at NEAR_IDENTITY_GATE (the spatial one through its last BN)."""
        _set_gate(self.channel_mlp[2], math.sqrt(NEAR_IDENTITY_GATE))
        _set_gate(self.spatial[4], math.sqrt(NEAR_IDENTITY_GATE))

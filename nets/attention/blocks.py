"""The published attention blocks phi 1-9, registered in phi order (nets/attention/registry.py);
DANet and CCNet (10, 11) are in nets/attention/self_attention.py.

Every block is `Block(channels, **kw)`, keeps the input shape, follows the
paper's official code (deviations are named in the block's docstring), and is
safe under float16/bfloat16 autocast: attention maps that sum many products
are computed in float32.

Each block also has `explain(x) -> {name: tensor}`: the gates it would apply to input x, computed by the
same methods its forward calls, so nothing is stored and training, CUDA graphs and ONNX export see
the forward alone. A map's shape says what it is: [B,C,1,1] a per-channel gate, [B,1,1,1] a scalar,
anything else (B,C|1,H|1,W|1 with H or W > 1) a spatial response.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nets.attention.registry import register_attention


# A block inserted into a pretrained detector starts as gate * x with its gates near this value
# (`start_near_identity`): the pretrained function is kept within a few per cent at step 0 while
# sigmoid'(logit(0.95)) = 0.048 leaves the gates trainable (a gate of exactly 1 would not learn).
NEAR_IDENTITY_GATE = 0.95


def _set_gate(layer: nn.Module, gate: float) -> None:
    """Make a layer that feeds a sigmoid output the constant logit(gate): weights 0, bias logit(gate)."""
    nn.init.zeros_(layer.weight)
    nn.init.constant_(layer.bias, math.log(gate / (1 - gate)))


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """Autocast switched off on x's device, for attention maps computed in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class BatchNormSingle1d(nn.BatchNorm1d):
    """BatchNorm1d that uses running statistics when a training batch holds a single vector.

    A batch of one pooled vector has no batch variance; plain BatchNorm1d raises there,
    which would break batch-1 training (BAM's channel gate). Eval mode is unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


@register_attention("se")
class SE(nn.Module):
    """Squeeze-and-Excitation (Hu et al., 2018): avg pool -> 1x1 conv C/r -> ReLU -> 1x1 conv C -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # b,c,h,w -> b,c,1,1 gate
        return x * self.fc(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel gate (SE has no spatial map)."""
        return {"channel gate": self.fc(x)}

    def start_near_identity(self) -> None:
        """The gate starts at NEAR_IDENTITY_GATE for every channel."""
        _set_gate(self.fc[3], NEAR_IDENTITY_GATE)


@register_attention("cbam")
class CBAM(nn.Module):
    """CBAM (Woo et al., 2018): channel gate (shared MLP on avg+max pool), then spatial gate (7x7 conv + BN)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(1),
        )

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        # b,c,h,w -> b,c (avg and max) -> shared MLP -> b,c,1,1
        return torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))[:, :, None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        # b,c,h,w -> b,2,h,w (max, mean over channels) -> b,1,h,w
        return torch.sigmoid(self.spatial(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(x)
        return x * self.spatial_gate(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel gate, and the spatial gate applied to the channel-gated input."""
        channel = self.channel_gate(x)
        return {"channel gate": channel, "spatial gate": self.spatial_gate(x * channel)}

    def start_near_identity(self) -> None:
        """Both gates start constant, their product at NEAR_IDENTITY_GATE (the spatial one through its BN's affine)."""
        gate = math.sqrt(NEAR_IDENTITY_GATE)
        _set_gate(self.mlp[2], gate)
        self.mlp[2].bias.data /= 2                  # the MLP's output is summed over the avg and max branches
        _set_gate(self.spatial[1], gate)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel: t = int(|(log2 C + b) / gamma|), made odd."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


@register_attention("eca")
class ECA(nn.Module):
    """Efficient Channel Attention (Wang et al., 2020): avg pool -> 1D conv over channels (no bias) -> sigmoid."""

    def __init__(self, channels: int, kernel_size: int | None = None):
        super().__init__()
        k = kernel_size or eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        # b,c,h,w -> b,1,c -> conv across channels -> b,c,1,1
        return torch.sigmoid(self.conv(x.mean((2, 3)).unsqueeze(1))).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The channel gate (ECA has no spatial map)."""
        return {"channel gate": self.gate(x)}


class HSwish(nn.Module):
    """h_swish(x) = x * ReLU6(x + 3) / 6, as in the Coordinate Attention code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


@register_attention("ca", "coord")
class CoordAttention(nn.Module):
    """Coordinate Attention (Hou et al., 2021): pooling along H and W, shared 1x1 conv, two direction gates."""

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        mip = max(8, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = HSwish()
        self.conv_h = nn.Conv2d(mip, channels, 1)
        self.conv_w = nn.Conv2d(mip, channels, 1)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The height gate [B,C,H,1] and the width gate [B,C,1,W]."""
        h, w = x.shape[2:]
        x_h = x.mean(3, keepdim=True)                        # b,c,h,1
        x_w = x.mean(2, keepdim=True).transpose(2, 3)        # b,c,w,1
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))  # b,mip,h+w,1
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))                # b,c,h,1
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))  # b,c,1,w
        return a_h, a_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return x * a_h * a_w

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The height and width gates and their product (what multiplies x)."""
        a_h, a_w = self.gates(x)
        return {"height gate": a_h, "width gate": a_w, "height x width gate": a_h * a_w}

    def start_near_identity(self) -> None:
        """The height and width gates start constant, their product at NEAR_IDENTITY_GATE."""
        _set_gate(self.conv_h, math.sqrt(NEAR_IDENTITY_GATE))
        _set_gate(self.conv_w, math.sqrt(NEAR_IDENTITY_GATE))


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

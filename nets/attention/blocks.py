"""The eleven published attention blocks, registered in phi order (nets/attention/registry.py).

Every block is `Block(channels, **kw)`, keeps the input shape, follows the
paper's official code (deviations are named in the block's docstring), and is
safe under float16/bfloat16 autocast: attention maps that sum many products
are computed in float32.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channel gate: b,c,h,w -> b,c (avg and max) -> shared MLP -> b,c,1,1
        gate = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        x = x * torch.sigmoid(gate)[:, :, None, None]
        # spatial gate: b,c,h,w -> b,2,h,w (max, mean over channels) -> b,1,h,w
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # b,c,h,w -> b,1,c -> conv across channels -> b,c,1,1
        y = self.conv(x.mean((2, 3)).unsqueeze(1))
        return x * torch.sigmoid(y).transpose(1, 2).unsqueeze(-1)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x_h = x.mean(3, keepdim=True)                        # b,c,h,1
        x_w = x.mean(2, keepdim=True).transpose(2, 3)        # b,c,w,1
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))  # b,mip,h+w,1
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))                # b,c,h,1
        a_w = torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))  # b,c,1,w
        return x * a_h * a_w

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, c // self.groups, h, w)
        x_c, x_s = x.chunk(2, dim=1)                          # each b*g, c/2g, h, w
        x_c = x_c * torch.sigmoid(self.cweight * x_c.mean((2, 3), keepdim=True) + self.cbias)
        x_s = x_s * torch.sigmoid(self.sweight * self.gn(x_s) + self.sbias)
        out = torch.cat([x_c, x_s], dim=1).reshape(b, c, h, w)
        # channel shuffle with 2 groups: b,2,c/2,h,w -> b,c/2,2,h,w
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
            gate = torch.sigmoid(t).reshape(b * self.groups, 1, h, w)
        return (g * gate.to(g.dtype)).reshape(b, c, h, w)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc = self.channel_gate(x.mean((2, 3)))[:, :, None, None]   # b,c,1,1
        ms = self.spatial_gate(x)                                    # b,1,h,w
        return x * (1 + torch.sigmoid(mc + ms))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        spatial_gate = torch.sigmoid(spatial).to(x.dtype)
        return x * channel_gate + x * spatial_gate

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channel gate on every pixel: b,c,h,w -> b,h,w,c -> MLP -> b,c,h,w
        gate = self.channel_mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x * torch.sigmoid(gate)
        return x * torch.sigmoid(self.spatial(x))

    def start_near_identity(self) -> None:
        """Both gates start constant, their product at NEAR_IDENTITY_GATE (the spatial one through its last BN)."""
        _set_gate(self.channel_mlp[2], math.sqrt(NEAR_IDENTITY_GATE))
        _set_gate(self.spatial[4], math.sqrt(NEAR_IDENTITY_GATE))


class _SelfAttention(nn.Module):
    """Query and key 1x1 convs to C/8, value conv to C, and a residual gain gamma starting at 0 (DANet, CCNet)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.key = nn.Conv2d(channels, max(1, channels // 8), 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))


class PositionAttention(_SelfAttention):
    """DANet position attention module: every pixel attends to every pixel; gamma starts at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).float()                                        # b,c/8,hw
        k = self.key(x).flatten(2).float()                                          # b,c/8,hw
        v = self.value(x).flatten(2).float()                                        # b,c,hw
        with _no_autocast(x):
            attn = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)           # b,hw,hw
            out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return self.gamma.to(x.dtype) * out.to(x.dtype) + x


class ChannelAttention(nn.Module):
    """DANet channel attention module: channel affinity (max-subtracted) re-weights channels; gamma starts at 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        with _no_autocast(x):
            flat = x.float().flatten(2)                                     # b,c,hw
            energy = torch.bmm(flat, flat.transpose(1, 2))                  # b,c,c
            energy = energy.amax(-1, keepdim=True) - energy
            out = torch.bmm(torch.softmax(energy, dim=-1), flat).reshape(b, c, h, w)
        return self.gamma.to(x.dtype) * out.to(x.dtype) + x


@register_attention("danet")
class DANet(nn.Module):
    """Dual Attention (Fu et al., 2019): position and channel attention modules, each with its residual, summed."""

    def __init__(self, channels: int):
        super().__init__()
        self.position = PositionAttention(channels)
        self.channel = ChannelAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.position(x) + self.channel(x)


class CrissCrossAttention(_SelfAttention):
    """Criss-cross attention (Huang et al., 2019): each pixel attends to its row and column; gamma starts at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.query(x).float(), self.key(x).float(), self.value(x).float()
        with _no_autocast(x):
            # energies along the column (b,h,w,h') and the row (b,h,w,w')
            e_col = torch.einsum("bchw,bcgw->bhwg", q, k)
            # a pixel is on its own row and column: count it once (in the row term); arange == arange, not
            # torch.eye, because ONNX Runtime has no boolean EyeLike
            rows = torch.arange(h, device=x.device)
            self_mask = (rows[:, None] == rows[None, :])[:, None, :]                  # h,1,h'
            e_col = e_col.masked_fill(self_mask, float("-inf"))
            e_row = torch.einsum("bchw,bchv->bhwv", q, k)
            attn = torch.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)
            a_col, a_row = attn[..., :h], attn[..., h:]
            out = torch.einsum("bcgw,bhwg->bchw", v, a_col) + torch.einsum("bchv,bhwv->bchw", v, a_row)
        return self.gamma.to(x.dtype) * out.to(x.dtype) + x


@register_attention("ccnet")
class CCNet(nn.Module):
    """Recurrent criss-cross attention (R=2, shared weights): two passes give every pixel full-image context."""

    def __init__(self, channels: int, recurrence: int = 2):
        super().__init__()
        self.cca = CrissCrossAttention(channels)
        self.recurrence = recurrence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x

    def start_near_identity(self) -> None:
        """gamma 0: the identity (already the paper's init; set again in case weights were loaded)."""
        nn.init.zeros_(self.cca.gamma)

"""The published attention blocks phi 1-4 (SE, CBAM, ECA, CA), registered in phi order
(nets/attention/registry.py), and what every block shares; phi 5-9 are in nets/attention/more_blocks.py,
DANet and CCNet (10, 11) in nets/attention/self_attention.py.

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

"""The self-attention blocks: DANet (position and channel attention) and CCNet (criss-cross attention).

Like every block (nets/attention/blocks.py), each has `explain(x)`: its attention, computed by the methods
its forward calls; DANet and CCNet attention maps are pixel-to-pixel, so they are summarised as the
attention each pixel (or channel) receives.
"""
from __future__ import annotations

import torch
from torch import nn

from nets.attention.blocks import _no_autocast
import nets.attention.more_blocks  # noqa: F401  (registers phi 1-9 first, keeping phi order)
from nets.attention.registry import register_attention


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

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-to-pixel attention [B,HW,HW] (row: query pixel, float32)."""
        q = self.query(x).flatten(2).float()                                        # b,c/8,hw
        k = self.key(x).flatten(2).float()                                          # b,c/8,hw
        with _no_autocast(x):
            return torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)           # b,hw,hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.attention(x)
        v = self.value(x).flatten(2).float()                                        # b,c,hw
        with _no_autocast(x):
            out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return self.gamma.to(x.dtype) * out.to(x.dtype) + x

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention each pixel receives, summed over query pixels [B,1,H,W] (mean 1), and the gain gamma."""
        b, _, h, w = x.shape
        return {"attention received": self.attention(x).sum(1).reshape(b, 1, h, w),
                "gamma": self.gamma.detach().reshape(1, 1, 1, 1).expand(b, 1, 1, 1)}


class ChannelAttention(nn.Module):
    """DANet channel attention module: channel affinity (max-subtracted) re-weights channels; gamma starts at 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-to-channel attention [B,C,C] (row: query channel, float32)."""
        with _no_autocast(x):
            flat = x.float().flatten(2)                                     # b,c,hw
            energy = torch.bmm(flat, flat.transpose(1, 2))                  # b,c,c
            return torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attn = self.attention(x)
        with _no_autocast(x):
            out = torch.bmm(attn, x.float().flatten(2)).reshape(b, c, h, w)
        return self.gamma.to(x.dtype) * out.to(x.dtype) + x

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention each channel receives, summed over query channels [B,C,1,1] (mean 1), and the gain gamma."""
        b = x.shape[0]
        return {"attention received": self.attention(x).sum(1)[:, :, None, None],
                "gamma": self.gamma.detach().reshape(1, 1, 1, 1).expand(b, 1, 1, 1)}


@register_attention("danet")
class DANet(nn.Module):
    """Dual Attention (Fu et al., 2019): position and channel attention modules, each with its residual, summed."""

    def __init__(self, channels: int):
        super().__init__()
        self.position = PositionAttention(channels)
        self.channel = ChannelAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.position(x) + self.channel(x)

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The position and the channel module's maps."""
        return {**{f"position {k}": v for k, v in self.position.explain(x).items()},
                **{f"channel {k}": v for k, v in self.channel.explain(x).items()}}


class CrissCrossAttention(_SelfAttention):
    """Criss-cross attention (Huang et al., 2019): each pixel attends to its row and column; gamma starts at 0."""

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pixel's attention along its column [B,H,W,H'] and its row [B,H,W,W'] (float32, together sum 1)."""
        h = x.shape[2]
        q, k = self.query(x).float(), self.key(x).float()
        with _no_autocast(x):
            # energies along the column (b,h,w,h') and the row (b,h,w,w')
            e_col = torch.einsum("bchw,bcgw->bhwg", q, k)
            # a pixel is on its own row and column: count it once (in the row term)
            # arange == arange, not torch.eye: ONNX Runtime has no boolean EyeLike
            rows = torch.arange(h, device=x.device)
            self_mask = (rows[:, None] == rows[None, :])[:, None, :]                  # h,1,h'
            e_col = e_col.masked_fill(self_mask, float("-inf"))
            e_row = torch.einsum("bchw,bchv->bhwv", q, k)
            attn = torch.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)
            return attn[..., :h], attn[..., h:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_col, a_row = self.attention(x)
        v = self.value(x).float()
        with _no_autocast(x):
            out = torch.einsum("bcgw,bhwg->bchw", v, a_col) + torch.einsum("bchv,bhwv->bchw", v, a_row)
        return self.gamma.to(x.dtype) * out.to(x.dtype) + x

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention each pixel receives from its row and column, summed over query pixels [B,1,H,W], and gamma."""
        a_col, a_row = self.attention(x)
        # column term: query (h,w) -> key (g,w); row term: query (h,w) -> key (h,v)
        received = a_col.sum(1).transpose(1, 2) + a_row.sum(2)                         # b,h,w
        return {"attention received": received[:, None],
                "gamma": self.gamma.detach().reshape(1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)}


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

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The criss-cross maps of every pass, each on that pass's input."""
        maps = {}
        for r in range(self.recurrence):
            maps.update({f"pass {r + 1} {k}": v for k, v in self.cca.explain(x).items()})
            x = self.cca(x)
        return maps

    def start_near_identity(self) -> None:
        """gamma 0: the identity (already the paper's init; set again in case weights were loaded)."""
        nn.init.zeros_(self.cca.gamma)

"""YOLOv5 (v6/v7, P5) with attention after the three backbone outputs and after both neck upsamples."""
from __future__ import annotations

import torch
from torch import nn

from nets.attention import attention_placement, build_point
from nets.backbones import FAMILY_STRIDES, build_backbone, normalise, register_normalisation
from nets.common import ConvBNAct, init_detection_bias
from nets.CSPdarknet import C3, CSPDarknet, scale_depth, scale_width

# (depth multiple, width multiple) per size
SIZES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}


class YoloV5Body(nn.Module):
    """PANet neck and three heads; returns raw maps [P5 (s32), P4 (s16), P3 (s8)], coarsest first.

    `attention`: one block for every point (phi or name), or {point: {"type": name, **options}}.
    `backbone`: None or a name nets.backbones knows (p3/p4/p5 = its stride 8/16/32 maps);
    `input_mean`/`input_std`: the normalisation applied first (None: input used as is).
    """

    strides = (32, 16, 8)
    POINT_NAMES = ("p3", "p4", "p5", "up5", "up4")
    POINT_STRIDES = {"p3": 8, "p4": 16, "p5": 32, "up5": 16, "up4": 8}

    def __init__(self, size: str, anchors_mask: list[list[int]], num_classes: int, attention: int | str | dict = 0,
                 backbone: str | None = None, input_mean: list[float] | None = None,
                 input_std: list[float] | None = None):
        super().__init__()
        register_normalisation(self, input_mean, input_std)
        place = attention_placement(attention, self.POINT_NAMES)
        if size not in SIZES:
            raise ValueError(f"unknown YOLOv5 size {size!r}; choose one of {', '.join(SIZES)}")
        gd, gw = SIZES[size]
        w = lambda c: scale_width(c, gw)   # noqa: E731
        n = scale_depth(3, gd)
        self.backbone = build_backbone(backbone, FAMILY_STRIDES["yolov5"], CSPDarknet, gd, gw)
        c3, c4, c5 = self.backbone.out_channels
        # attention on the backbone outputs that feed the neck, and after each neck upsample
        self.p3_att, self.p4_att, self.p5_att = (build_point(place[p], c)
                                                 for p, c in zip(("p3", "p4", "p5"), self.backbone.out_channels))
        self.lateral5 = ConvBNAct(c5, w(512), 1)
        self.up5_att = build_point(place["up5"], w(512))
        self.c3_p4 = C3(w(512) + c4, w(512), n, shortcut=False)
        self.lateral4 = ConvBNAct(w(512), w(256), 1)
        self.up4_att = build_point(place["up4"], w(256))
        self.c3_p3 = C3(w(256) + c3, w(256), n, shortcut=False)
        self.down3 = ConvBNAct(w(256), w(256), 3, 2)
        self.c3_n4 = C3(w(512), w(512), n, shortcut=False)
        self.down4 = ConvBNAct(w(512), w(512), 3, 2)
        self.c3_n5 = C3(w(1024), w(1024), n, shortcut=False)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        outs = [len(m) * (5 + num_classes) for m in anchors_mask]          # coarsest first
        self.head = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip((w(1024), w(512), w(256)), outs))
        for conv, mask, stride in zip(self.head, anchors_mask, self.strides):
            init_detection_bias(conv, len(mask), num_classes, stride)

    def attention_points(self) -> dict[str, nn.Module]:
        """The named insertion points and the block at each."""
        return {"p3": self.p3_att, "p4": self.p4_att, "p5": self.p5_att, "up5": self.up5_att, "up4": self.up4_att}

    def attention_layout(self, input_size: int) -> dict[str, tuple[int, int, int]]:
        """Each point's feature map at a square input: (channels, height, width)."""
        channels = dict(zip(("p3", "p4", "p5"), self.backbone.out_channels))
        channels.update(up5=self.lateral5.conv.out_channels, up4=self.lateral4.conv.out_channels)
        return {p: (channels[p], input_size // s, input_size // s) for p, s in self.POINT_STRIDES.items()}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = normalise(self, x)
        p3, p4, p5 = self.backbone(x)
        p3, p4, p5 = self.p3_att(p3), self.p4_att(p4), self.p5_att(p5)
        # top-down: 20,20,1024w -> 20,20,512w -> 40,40,512w (+ P4) -> 40,40,512w
        lat5 = self.lateral5(p5)
        t4 = self.c3_p4(torch.cat([self.up5_att(self.upsample(lat5)), p4], 1))
        # 40,40,512w -> 40,40,256w -> 80,80,256w (+ P3) -> 80,80,256w
        lat4 = self.lateral4(t4)
        n3 = self.c3_p3(torch.cat([self.up4_att(self.upsample(lat4)), p3], 1))
        # bottom-up: 80,80,256w -> 40,40,256w (+ lateral4) -> 40,40,512w -> 20,20,512w (+ lateral5) -> 20,20,1024w
        n4 = self.c3_n4(torch.cat([self.down3(n3), lat4], 1))
        n5 = self.c3_n5(torch.cat([self.down4(n4), lat5], 1))
        return [head(f) for head, f in zip(self.head, (n5, n4, n3))]

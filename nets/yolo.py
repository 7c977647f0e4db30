"""Detector bodies and the config that rebuilds them.

A config is the plain dict a checkpoint carries (DESIGN.md, contract 5); `build_model(config)`
is the only place a config becomes a network.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nets.attention import attention_name, attention_phi, build_attention
from nets.common import init_detection_bias
from nets.CSPdarknet53_tiny import CSPDarknet53Tiny, basic_conv

MODEL_DATA = Path(__file__).resolve().parent.parent / "model_data"
YOLOV5_SIZES = ("n", "s", "m", "l", "x")
MODEL_NAMES = ("yolov4-tiny", *(f"yolov5{s}" for s in YOLOV5_SIZES))
# anchors file and masks (coarsest level first) per family
FAMILY_ANCHORS = {
    "yolov4-tiny": ("yolov4_tiny_anchors.txt", [[3, 4, 5], [1, 2, 3]]),
    "yolov5": ("yolov5_anchors.txt", [[6, 7, 8], [3, 4, 5], [0, 1, 2]]),
}


def model_family(model: str) -> str:
    """'yolov4-tiny' or 'yolov5' for a model name; unknown names raise ValueError."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return "yolov4-tiny" if model == "yolov4-tiny" else "yolov5"


# each family's own head style (nets/heads.py turns a style name into a head)
FAMILY_HEAD = {"yolov4-tiny": "yolov4", "yolov5": "yolov5"}
HEADS = tuple(FAMILY_HEAD.values())


def read_anchors(path: str | Path) -> list[list[float]]:
    """Anchors file 'w,h, w,h, ...' -> [[w, h], ...] in input pixels."""
    values = [float(v) for v in Path(path).read_text().replace("\n", ",").split(",") if v.strip()]
    if not values or len(values) % 2:
        raise ValueError(f"{path}: expected comma-separated 'w,h' pairs of anchor sizes")
    return [values[i:i + 2] for i in range(0, len(values), 2)]


def make_config(model: str = "yolov4-tiny", phi: int | str = 0, class_names: list[str] | tuple = (),
                input_shape: tuple[int, int] = (416, 416), anchors: list | None = None,
                head: str | None = None) -> dict:
    """The self-describing model config stored in every checkpoint."""
    family = model_family(model)
    anchors_file, anchors_mask = FAMILY_ANCHORS[family]
    anchors = anchors or read_anchors(MODEL_DATA / anchors_file)
    if not class_names:
        raise ValueError("the model needs at least one class name")
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if any(s % 32 for s in input_shape):
        raise ValueError(f"input size {tuple(input_shape)} must be a multiple of 32")
    return {
        "model": model,
        "attention": attention_name(phi),
        "phi": attention_phi(phi),
        "backbone": "cspdarknet53-tiny" if family == "yolov4-tiny" else "cspdarknet-v5",
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "anchors": [[float(w), float(h)] for w, h in anchors],
        "anchors_mask": anchors_mask,
        "input_shape": [int(input_shape[0]), int(input_shape[1])],
        "head": head or FAMILY_HEAD[family],
    }


def yolo_head(channels: tuple[int, int], in_channels: int) -> nn.Sequential:
    """3x3 conv then the 1x1 prediction conv."""
    return nn.Sequential(basic_conv(in_channels, channels[0], 3), nn.Conv2d(channels[0], channels[1], 1))


class Upsample(nn.Module):
    """1x1 conv then nearest 2x upsampling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.Sequential(basic_conv(in_channels, out_channels, 1), nn.Upsample(scale_factor=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class YoloBody(nn.Module):
    """YOLOv4-tiny with attention at `feat1`, `feat2` and `upsample`; returns [P5 (13x13), P4 (26x26)] raw maps."""

    strides = (32, 16)

    def __init__(self, anchors_mask: list[list[int]], num_classes: int, phi: int | str = 0):
        super().__init__()
        self.backbone = CSPDarknet53Tiny()
        out5 = len(anchors_mask[0]) * (5 + num_classes)
        out4 = len(anchors_mask[1]) * (5 + num_classes)
        self.conv_for_P5 = basic_conv(512, 256, 1)
        self.yolo_headP5 = yolo_head((512, out5), 256)
        self.upsample = Upsample(256, 128)
        self.yolo_headP4 = yolo_head((256, out4), 384)
        self.feat1_att = build_attention(phi, 256)
        self.feat2_att = build_attention(phi, 512)
        self.upsample_att = build_attention(phi, 128)
        init_detection_bias(self.yolo_headP5[1], len(anchors_mask[0]), num_classes, 32)
        init_detection_bias(self.yolo_headP4[1], len(anchors_mask[1]), num_classes, 16)

    def attention_points(self) -> dict[str, nn.Module]:
        """The named insertion points and the block at each."""
        return {"feat1": self.feat1_att, "feat2": self.feat2_att, "upsample": self.upsample_att}

    def backbone_parameters(self):
        """Parameters frozen during --freeze-epochs."""
        return self.backbone.parameters()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # 416,416,3 -> feat1 26,26,256 and feat2 13,13,512
        feat1, feat2 = self.backbone(x)
        feat1 = self.feat1_att(feat1)
        feat2 = self.feat2_att(feat2)
        # 13,13,512 -> 13,13,256
        p5 = self.conv_for_P5(feat2)
        # 13,13,256 -> 13,13,512 -> 13,13,3*(5+C)
        out0 = self.yolo_headP5(p5)
        # 13,13,256 -> 13,13,128 -> 26,26,128
        p5_up = self.upsample_att(self.upsample(p5))
        # 26,26,256 + 26,26,128 -> 26,26,384 -> 26,26,256 -> 26,26,3*(5+C)
        out1 = self.yolo_headP4(torch.cat([p5_up, feat1], dim=1))
        return [out0, out1]


REQUIRED_KEYS = ("model", "attention", "num_classes", "anchors", "anchors_mask", "input_shape")


def build_model(config: dict) -> nn.Module:
    """The network described by a config from make_config / a checkpoint."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    family = model_family(config["model"])
    if family == "yolov4-tiny":
        return YoloBody(config["anchors_mask"], config["num_classes"], config["attention"])
    from nets.yolov5 import YoloV5Body  # noqa: PLC0415 (kept lazy: most runs build one family)
    return YoloV5Body(config["model"][-1], config["anchors_mask"], config["num_classes"], config["attention"])

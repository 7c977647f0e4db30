"""Detector bodies and the model config that rebuilds them.

A checkpoint stores a `utils.config.ModelConfig` as a plain dict; `build_model(config)` is the only
place a config becomes a network, and `model_config(...)` the one place family defaults
(anchors, masks, backbone, head) are filled in.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from nets.attention import attention_name, attention_placement, build_point
from nets.backbones import (FAMILY_STRIDES, backbone_normalisation, build_backbone, check_backbone, normalise,
                            register_normalisation)
from nets.common import init_detection_bias
from nets.CSPdarknet53_tiny import CSPDarknet53Tiny, basic_conv
from utils.config import MODEL_NAMES, ModelConfig

MODEL_DATA = Path(__file__).resolve().parent.parent / "model_data"
YOLOV5_SIZES = ("n", "s", "m", "l", "x")
# per family: anchors file, masks (coarsest level first), backbone, head style
FAMILY_DEFAULTS = {
    "yolov4-tiny": ("yolov4_tiny_anchors.txt", [[3, 4, 5], [1, 2, 3]], "cspdarknet53-tiny", "yolov4"),
    "yolov5": ("yolov5_anchors.txt", [[6, 7, 8], [3, 4, 5], [0, 1, 2]], "cspdarknet-v5", "yolov5"),
}
# what a checkpoint's config must hold to rebuild its network
REQUIRED_KEYS = ("model", "attention", "class_names", "anchors", "anchors_mask", "input_shape")


def model_family(model: str) -> str:
    """'yolov4-tiny' or 'yolov5' for a model name; unknown names raise ValueError."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return "yolov4-tiny" if model == "yolov4-tiny" else "yolov5"


def read_anchors(path: str | Path) -> list[list[float]]:
    """Anchors file 'w,h, w,h, ...' -> [[w, h], ...] in input pixels."""
    values = [float(v) for v in Path(path).read_text().replace("\n", ",").split(",") if v.strip()]
    if not values or len(values) % 2:
        raise ValueError(f"{path}: expected comma-separated 'w,h' pairs of anchor sizes")
    return [values[i:i + 2] for i in range(0, len(values), 2)]


def complete_model_config(config: ModelConfig) -> ModelConfig:
    """Family defaults filled in, block names made canonical; checked (a bad value raises ValueError)."""
    model_family(config.model)
    anchors_file, anchors_mask, backbone, head = FAMILY_DEFAULTS[config.family]
    placed = {point: {**spec, "type": attention_name(spec.get("type"))} for point, spec in config.attention_points.items()}
    backbone = check_backbone(config.backbone or backbone, config.family)
    mean, std = ((config.input_mean, config.input_std) if config.input_mean is not None or config.input_std is not None
                 else backbone_normalisation(backbone))
    config = dataclasses.replace(
        config, attention=attention_name(config.attention), attention_points=placed, head=config.head or head,
        backbone=backbone, input_mean=mean, input_std=std, anchors=[[float(w), float(h)] for w, h in
                                                       (config.anchors or read_anchors(MODEL_DATA / anchors_file))],
        anchors_mask=config.anchors_mask or [list(m) for m in anchors_mask])
    _points(config)                     # a per-point spec naming a point this model lacks is an error
    return config.validate()


def model_config(model: str = "yolov4-tiny", phi: int | str = 0, class_names: list[str] | tuple = (),
                 input_shape: tuple[int, int] = (416, 416), anchors: list | None = None, head: str | None = None,
                 attention_points: dict | None = None) -> ModelConfig:
    """A complete, checked ModelConfig: `phi` at every point, `attention_points` overriding single points."""
    return complete_model_config(ModelConfig(model=model, attention=str(phi), attention_points=attention_points or {},
                                             head=head, input_shape=[int(s) for s in input_shape],
                                             class_names=list(class_names), anchors=anchors))


def make_config(*args, **kwargs) -> dict:
    """`model_config(...)` in the plain-dict form a checkpoint stores."""
    return model_config(*args, **kwargs).to_dict()


def as_model_config(config: ModelConfig | dict) -> ModelConfig:
    """A ModelConfig from a checkpoint's dict (checked, version-upgraded), or the object itself."""
    if isinstance(config, ModelConfig):
        return config
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    return complete_model_config(ModelConfig.from_dict(config))


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
    """YOLOv4-tiny with attention at `feat1`, `feat2` and `upsample`; returns [P5 (13x13), P4 (26x26)] raw maps.

    `attention`: one block for every point (phi or name), or {point: {"type": name, **options}}.
    `backbone`: None or a name nets.backbones knows (feat1 = its stride-16 map, feat2 = stride 32);
    `input_mean`/`input_std`: the normalisation applied first (None: input used as is).
    """

    strides = (32, 16)
    # insertion point -> (channels, stride) with the built-in backbone
    POINTS = {"feat1": (256, 16), "feat2": (512, 32), "upsample": (128, 16)}

    def __init__(self, anchors_mask: list[list[int]], num_classes: int, attention: int | str | dict = 0,
                 backbone: str | None = None, input_mean: list[float] | None = None,
                 input_std: list[float] | None = None):
        super().__init__()
        place = attention_placement(attention, tuple(self.POINTS))
        register_normalisation(self, input_mean, input_std)
        self.backbone = build_backbone(backbone, FAMILY_STRIDES["yolov4-tiny"], CSPDarknet53Tiny)
        c1, c2 = getattr(self.backbone, "out_channels", (256, 512))
        self.channels = {"feat1": c1, "feat2": c2, "upsample": 128}
        out5 = len(anchors_mask[0]) * (5 + num_classes)
        out4 = len(anchors_mask[1]) * (5 + num_classes)
        self.conv_for_P5 = basic_conv(c2, 256, 1)
        self.yolo_headP5 = yolo_head((512, out5), 256)
        self.upsample = Upsample(256, 128)
        self.yolo_headP4 = yolo_head((256, out4), 128 + c1)
        self.feat1_att = build_point(place["feat1"], c1)
        self.feat2_att = build_point(place["feat2"], c2)
        self.upsample_att = build_point(place["upsample"], 128)
        init_detection_bias(self.yolo_headP5[1], len(anchors_mask[0]), num_classes, 32)
        init_detection_bias(self.yolo_headP4[1], len(anchors_mask[1]), num_classes, 16)

    def attention_points(self) -> dict[str, nn.Module]:
        """The named insertion points and the block at each."""
        return {"feat1": self.feat1_att, "feat2": self.feat2_att, "upsample": self.upsample_att}

    def attention_layout(self, input_size: int) -> dict[str, tuple[int, int, int]]:
        """Each point's feature map at a square input: (channels, height, width)."""
        return {p: (self.channels[p], input_size // s, input_size // s) for p, (_, s) in self.POINTS.items()}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = normalise(self, x)
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


def build_model(config: ModelConfig | dict) -> nn.Module:
    """The network a (checkpoint's) model config describes."""
    config = as_model_config(config)
    place = {p: config.block_at(p) for p in _points(config)}
    backbone = dict(backbone=config.backbone, input_mean=config.input_mean, input_std=config.input_std)
    if config.family == "yolov4-tiny":
        return YoloBody(config.anchors_mask, config.num_classes, place, **backbone)
    from nets.yolov5 import YoloV5Body  # noqa: PLC0415 (kept lazy: most runs build one family)
    return YoloV5Body(config.model[-1], config.anchors_mask, config.num_classes, place, **backbone)


def _points(config: ModelConfig) -> tuple[str, ...]:
    """The insertion points of a config's model; a per-point spec naming another point is an error."""
    if config.family == "yolov4-tiny":
        points = tuple(YoloBody.POINTS)
    else:
        from nets.yolov5 import YoloV5Body  # noqa: PLC0415
        points = YoloV5Body.POINT_NAMES
    attention_placement(config.attention_points, points)      # raises for unknown points
    return points

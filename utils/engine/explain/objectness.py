"""Objectness heatmap: per pixel, the highest objectness over anchors and levels."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.ops.boxes import split_level
from utils.ops.images import map_to_image
from utils.ops.overlay import Panel, heatmap_figure

if TYPE_CHECKING:
    from yolo import YOLO


@torch.no_grad()
def objectness_map(yolo: YOLO, image_bgr: np.ndarray) -> np.ndarray:
    """[h0,w0] over the original image: the highest objectness (0..1) of any anchor at any level there."""
    batch, metas = yolo.preprocess([image_bgr])
    heat = None
    for raw, mask in zip(yolo.forward(batch), yolo.model_config.anchors_mask):
        obj = split_level(raw.float(), len(mask))[0, ..., 4].sigmoid().amax(0)      # A,H',W' -> H',W'
        level = map_to_image(obj.cpu().numpy(), metas[0], yolo.input_shape)
        heat = level if heat is None else np.maximum(heat, level)
    return heat


def objectness_picture(yolo: YOLO, image_bgr: np.ndarray) -> np.ndarray:
    """The image with its objectness map in colour over it, a colour bar in absolute values and a legend."""
    return heatmap_figure(image_bgr, Panel("spatial", "objectness (highest over anchors and levels); colours: this "
                                           "image's min-max, values on the bar", objectness_map(yolo, image_bgr)))

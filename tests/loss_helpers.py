"""Losses and outputs the loss tests share (tests/test_loss.py, tests/test_loss_assignment.py)."""
import torch

from nets.yolo import make_config
from nets.yolo_training import YoloLoss, load_hyp
from utils.data.loader import per_image_targets


def v4_loss(num_classes=3, size=128, **hyp_overrides):
    config = make_config("yolov4-tiny", 0, [f"c{i}" for i in range(num_classes)], input_shape=(size, size))
    return YoloLoss(config, {**load_hyp("yolov4-tiny"), **hyp_overrides})


def positives_at(crit, targets, level):
    """crit.positives on zero outputs of the config's shapes, for one level."""
    size = crit.input_shape[0]
    strides = [32, 16] if len(crit.anchors_mask) == 2 else [32, 16, 8]
    outputs = [torch.zeros(int(targets[:, 0].max()) + 1, len(m) * (5 + crit.num_classes), size // s, size // s)
               for m, s in zip(crit.anchors_mask, strides)]
    return crit.positives(outputs, per_image_targets(targets, len(outputs[0])))[level]


def random_outputs(num_classes=3, size=128, batch=2, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    c = 3 * (5 + num_classes)
    return [torch.randn(batch, c, size // s, size // s, generator=g) * scale for s in (32, 16)]

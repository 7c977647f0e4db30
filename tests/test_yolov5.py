"""YOLOv5 n/s/m/l/x: parameter counts, output shapes for every attention block, a training step, a checkpoint round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nets.attention import ATTENTION_NAMES, CoordAttention
from nets.yolo import build_model, make_config
from nets.yolo_training import YoloLoss, load_hyp
from utils.engine.checkpoint import save_checkpoint
from utils.data.loader import per_image_targets
from yolo import YOLO

# ultralytics YOLOv5 v6/v7 parameter counts
COUNTS = {"n": (1_872_157, 1_790_977), "s": (7_235_389, 7_073_569), "m": (21_190_557, 20_948_097),
          "l": (46_563_709, 46_240_609), "x": (86_749_405, 86_345_665)}


def names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


@pytest.mark.parametrize("size", list(COUNTS))
def test_parameter_counts_at_80_and_20_classes(size):
    for classes, expected in zip((80, 20), COUNTS[size]):
        model = build_model(make_config(f"yolov5{size}", 0, names(classes)))
        assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("img", [640, 416])
def test_output_shapes_for_every_phi(img):
    x = torch.zeros(1, 3, img, img)
    for phi in range(len(ATTENTION_NAMES)):
        model = build_model(make_config("yolov5n", phi, names(3), (img, img))).eval()
        with torch.no_grad():
            shapes = [tuple(o.shape) for o in model(x)]
        assert shapes == [(1, 24, img // 32, img // 32), (1, 24, img // 16, img // 16), (1, 24, img // 8, img // 8)]


def test_attention_points_follow_the_width():
    model = build_model(make_config("yolov5s", "ca", names(3)))
    points = model.attention_points()
    assert list(points) == ["p3", "p4", "p5", "up5", "up4"]
    assert all(isinstance(m, CoordAttention) for m in points.values())
    assert [m.conv_h.out_channels for m in points.values()] == [128, 256, 512, 256, 128]


@pytest.mark.parametrize("size", ["n", "s"])
def test_a_training_step_lowers_the_loss(size):
    """One small step along the negative gradient lowers the loss by about what the gradient predicts.

    A step of length eta along -g/|g| changes the loss by -eta*|g| to first order; asserting half of that
    leaves a wide margin for the float rounding of other thread counts (a few optimiser steps would not).
    """
    torch.manual_seed(0)
    config = make_config(f"yolov5{size}", 4, names(2), (128, 128))
    model = build_model(config).eval()         # fixed BatchNorm statistics: the same function before and after
    loss_fn = YoloLoss(config, load_hyp(config["model"]))
    images = torch.rand(2, 3, 128, 128)
    targets = per_image_targets(torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.3], [1, 1, 0.3, 0.6, 0.2, 0.4]]), 2)
    loss, _ = loss_fn(model(images), targets)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    grads = [p.grad for p in model.parameters()]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    eta = 1e-3 * loss.item() / norm            # predicted decrease: 0.1 % of the loss
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= eta * g / norm
        after, _ = loss_fn(model(images), targets)
    predicted = eta * norm
    assert np.isfinite(after.item()) and loss.item() - after.item() > 0.5 * predicted, (loss.item(), after.item())


def test_checkpoint_round_trip_through_yolo(tmp_path):
    torch.manual_seed(0)
    config = make_config("yolov5n", "cbam", names(2), (128, 128))
    model = build_model(config).eval()
    path = tmp_path / "v5.pt"
    save_checkpoint({"model": model.state_dict(), "config": config}, path)
    yolo = YOLO(path, device="cpu", conf=0.0, nms_iou=0.5)
    assert yolo.config["model"] == "yolov5n" and yolo.head == "yolov5"
    image = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    dets = yolo.predict(image)[0]
    assert dets.shape[1] == 6 and len(dets) > 0
    assert (dets[:, [0, 2]] <= 160).all() and (dets[:, [1, 3]] <= 96).all()
    # the same raw outputs as the model built here: YOLO rebuilt it from the config alone
    batch, _ = yolo.preprocess([image])
    with torch.no_grad():
        ours = model(batch.float() / 255)
    for a, b in zip(ours, yolo.forward(batch)):
        torch.testing.assert_close(a, b)

"""Non-maximum suppression against a plain greedy reference, per image and class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.ops.boxes import non_max_suppression


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def greedy(boxes, scores, classes, conf, iou_thres, max_det):
    """Highest score first; drop a box overlapping a kept box of its class by more than iou_thres."""
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= conf:
            break
        if all(classes[j] != classes[i] or iou(boxes[i], boxes[j]) <= iou_thres for j in kept):
            kept.append(i)
    return kept[:max_det]


@pytest.mark.parametrize("multi_label", [False, True])
def test_nms_matches_greedy_reference(multi_label):
    g = torch.Generator().manual_seed(0)
    b, n, c = 3, 300, 4
    pred = torch.empty(b, n, 5 + c)
    pred[..., :2] = torch.rand(b, n, 2, generator=g) * 100             # clustered centres: many overlaps
    pred[..., 2:4] = torch.rand(b, n, 2, generator=g) * 30 + 5
    pred[..., 4:] = torch.rand(b, n, 1 + c, generator=g)
    pred[1, :, 4] = 0.0                                                  # an image with no candidates
    out = non_max_suppression(pred, conf_thres=0.2, iou_thres=0.45, max_det=40, multi_label=multi_label)
    assert len(out) == b and len(out[1]) == 0
    for image in (0, 2):
        p = pred[image].numpy()
        xyxy = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
        scores = p[:, 5:] * p[:, 4:5]                                    # N,C
        if multi_label:
            boxes, flat = np.repeat(xyxy, c, 0), scores.reshape(-1)
            classes = np.tile(np.arange(c), n)
        else:
            boxes, flat, classes = xyxy, scores.max(1), scores.argmax(1)
        expected = greedy(boxes, flat, classes, 0.2, 0.45, 40)
        got = out[image].numpy()
        assert len(got) == len(expected)
        np.testing.assert_allclose(got[:, :4], boxes[expected], atol=1e-4)
        np.testing.assert_allclose(got[:, 4], flat[expected], atol=1e-6)
        np.testing.assert_array_equal(got[:, 5], classes[expected])

"""What an exported ONNX graph computes beyond the network: decode and NMS inside the graph (`--nms`).

The decode is the head's own (nets/heads.py), so an in-graph decode cannot drift from the Python one;
only the cells (grid, anchor, stride per prediction slot) are rebuilt from the traced output shapes,
so the graph follows a dynamic input size. NMS is ONNX's NonMaxSuppression, fed the same way
torchvision's batched_nms works: each box's best class, boxes of different classes moved apart.

Output of a `--nms` graph, `detections` [K, 7] float32: (image index in the batch, x1, y1, x2, y2, score,
class), boxes in input (letterboxed) pixels, per image at most `max_det`, best score first.
"""
from __future__ import annotations

import torch
from torch import nn

from nets.heads import build_head
from utils.config import ModelConfig
from utils.ops.boxes import Cells, cxcywh_to_xyxy, grid_xy

DETECTION_COLUMNS = ("image", "x1", "y1", "x2", "y2", "score", "class")


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression: boxes [B,N,4] xyxy, scores [B,1,N] -> selected [K,3] (image, 0, box index).

    The eager forward gives the same answer through torchvision, so the module also runs in PyTorch.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_image, iou_threshold, score_threshold):  # noqa: D102
        from torchvision.ops import nms  # noqa: PLC0415 (lazy: torchvision.ops imports torch._dynamo, seconds)
        selected = []
        for b in range(boxes.shape[0]):
            keep = (scores[b, 0] > score_threshold).nonzero().flatten()
            kept = keep[nms(boxes[b, keep], scores[b, 0, keep], float(iou_threshold))]
            kept = kept[:int(max_per_image)]
            selected.append(torch.stack([torch.full_like(kept, b), torch.zeros_like(kept), kept], 1))
        return torch.cat(selected)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_image, iou_threshold, score_threshold):  # noqa: D102
        return g.op("NonMaxSuppression", boxes, scores, max_per_image, iou_threshold, score_threshold,
                    center_point_box_i=0)


def traced_cells(outputs: list[torch.Tensor], level_anchors: list[torch.Tensor], strides: list[float]) -> Cells:
    """Cells from the outputs' own (traced) sizes: grid and anchors follow a dynamic input, strides are the body's."""
    grids, anchors, stride, level, offsets, start = [], [], [], [], [], 0
    for lvl, (raw, la, s) in enumerate(zip(outputs, level_anchors, strides)):
        h, w, a = raw.shape[2], raw.shape[3], la.shape[0]
        offsets.append(start)
        start += a * h * w
        grid = grid_xy(h, w, raw.device).view(1, -1, 2).expand(a, -1, -1).reshape(-1, 2)           # A*H*W,2
        grids.append(grid)
        anchors.append(la.view(a, 1, 2).expand(-1, h * w, -1).reshape(-1, 2))
        stride.append(torch.ones_like(grid[:, :1]) * s)
        level.append(torch.full_like(grid[:, 0], lvl).long())
    return Cells(torch.cat(grids), torch.cat(anchors), torch.cat(stride), torch.cat(level), offsets,
                 [tuple(o.shape[2:]) for o in outputs], [len(la) for la in level_anchors])


class DetectionGraph(nn.Module):
    """Network + decode + NMS: (images [B,3,H,W] 0..1 RGB, score threshold [1], IoU threshold [1]) -> [K,7]."""

    def __init__(self, model: nn.Module, config: ModelConfig, strides: list[float], max_det: int = 300):
        super().__init__()
        self.model, self.head, self.strides = model, build_head(config), [float(s) for s in strides]
        anchors = torch.tensor(config.anchors, dtype=torch.float32)
        for i, mask in enumerate(config.anchors_mask):
            self.register_buffer(f"anchors{i}", anchors[mask], persistent=False)
        self.levels = len(config.anchors_mask)
        self.register_buffer("max_det", torch.tensor([max_det], dtype=torch.int64), persistent=False)

    def forward(self, images: torch.Tensor, score_threshold: torch.Tensor,
                iou_threshold: torch.Tensor) -> torch.Tensor:
        outputs = self.model(images)
        level_anchors = [getattr(self, f"anchors{i}") for i in range(self.levels)]
        pred = self.head.decode_outputs(outputs, traced_cells(outputs, level_anchors, self.strides))   # B,N,5+C
        scores, cls = (pred[..., 5:] * pred[..., 4:5]).max(-1)                                         # B,N
        boxes = cxcywh_to_xyxy(pred[..., :4])                                                          # B,N,4
        # classes kept apart as batched_nms does: each class's boxes moved beyond every other's
        apart = boxes + (cls.to(boxes.dtype) * (boxes.max() + 1))[..., None]
        selected = _NonMaxSuppression.apply(apart, scores[:, None], self.max_det, iou_threshold, score_threshold)
        image, index = selected[:, 0], selected[:, 2]                                                  # K, K
        return torch.cat([image[:, None].to(boxes.dtype), boxes[image, index], scores[image, index][:, None],
                          cls[image, index][:, None].to(boxes.dtype)], 1)                              # K,7

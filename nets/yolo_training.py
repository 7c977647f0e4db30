"""Target assignment and loss for both families, vectorised over the batch's targets [M, 6].

YOLOv4-tiny: each box goes to its best-IoU anchor (and any anchor above `anchor_iou_thresh`)
in the cell holding its centre; objectness target 1, with the predictions that already
overlap a box by more than `ignore_thresh` left out of the objectness loss.
YOLOv5: a box goes to every anchor whose width/height ratio is within `anchor_t`, in its cell
and the two nearest neighbouring cells; objectness target = the detached IoU.
Both: CIoU box loss (torchvision.ops), BCE objectness and classes, label smoothing,
per-level balance, gains scaled by levels, classes and image size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torchvision.ops import complete_box_iou_loss

from nets.yolo import MODEL_DATA, head_style, model_family
from utils.boxes import box_iou_batched, cxcywh_to_xyxy, decode_wh, decode_xy, grid_xy, split_level

HYP_FILES = {"yolov4-tiny": "hyp.yolov4-tiny.yaml", "yolov5": "hyp.scratch-low.yaml"}
# neighbour cells YOLOv5 also assigns: centre, left, up, right, down
NEIGHBOUR_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)


def load_hyp(model: str, path: str | Path | None = None) -> dict:
    """Hyperparameters for a model: `path` if given, else the family's YAML in model_data/."""
    path = Path(path) if path else MODEL_DATA / HYP_FILES[model_family(model)]
    if not path.is_file():
        raise FileNotFoundError(f"hyperparameter file {path} not found")
    hyp = yaml.safe_load(path.read_text())
    if not isinstance(hyp, dict):
        raise ValueError(f"{path}: expected a mapping of hyperparameters")
    return hyp


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing a centre: [M, 2] x [K, 2] -> [M, K]."""
    inter = torch.minimum(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter + 1e-9)


def smooth_targets(label_smoothing: float) -> tuple[float, float]:
    """BCE targets (positive, negative) with label smoothing eps: 1 - eps/2 and eps/2."""
    return 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing


class YoloLoss:
    """Callable: (raw outputs coarsest first, targets [M, 6]) -> (loss, parts)."""

    def __init__(self, config: dict, hyp: dict):
        self.head = head_style(config)
        self.anchors = torch.tensor(config["anchors"], dtype=torch.float32)       # nA,2 input pixels
        self.anchors_mask = config["anchors_mask"]
        self.num_classes = config["num_classes"]
        self.input_shape = config["input_shape"]                                   # h, w
        num_levels = len(self.anchors_mask)
        self.box_gain = hyp["box"] * 3 / num_levels
        self.cls_gain = hyp["cls"] * self.num_classes / 80 * 3 / num_levels
        self.obj_gain = hyp["obj"] * (max(self.input_shape) / 640) ** 2 * 3 / num_levels
        self.balance = {int(k): float(v) for k, v in hyp["balance"].items()}       # by stride
        self.cls_pos, self.cls_neg = smooth_targets(hyp.get("label_smoothing", 0.0))
        self.anchor_t = hyp.get("anchor_t", 4.0)
        self.anchor_iou_thresh = hyp.get("anchor_iou_thresh", 1.0)
        # the ignore threshold belongs to YOLOv4's objectness target of 1; YOLOv5's target is the IoU itself
        self.ignore_thresh = hyp.get("ignore_thresh") if self.head == "yolov4" else None

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        device = outputs[0].device
        targets = targets.to(device).float()
        batch = outputs[0].shape[0]
        anchors = self.anchors.to(device)
        gt_boxes = self._padded_boxes(targets, batch) if self.ignore_thresh is not None else None
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for raw, mask in zip(outputs, self.anchors_mask):
            p = split_level(raw, len(mask)).float()                                 # B,A,H,W,5+C
            h, w = p.shape[2:4]
            stride = self.input_shape[0] / h
            scale = torch.tensor([w, h], device=device, dtype=torch.float32)
            b, a, gj, gi, tbox, tcls = self._assign(targets, anchors, mask, stride, scale)
            tobj = torch.zeros(p.shape[:4], device=device)
            if b.numel():
                ps = p[b, a, gj, gi]                                                # n,5+C
                anchor_grid = anchors[mask][a] / stride
                pbox = torch.cat([decode_xy(ps[:, :2], self.head), decode_wh(ps[:, 2:4], anchor_grid, self.head)], 1)
                box_loss = complete_box_iou_loss(cxcywh_to_xyxy(pbox), cxcywh_to_xyxy(tbox), reduction="none")
                lbox = lbox + box_loss.mean()
                obj_target = (1.0 - box_loss).detach().clamp(0) if self.head == "yolov5" else torch.ones_like(box_loss)
                # several boxes may claim one cell and anchor: keep the best, independent of their order
                cell = ((b * len(mask) + a) * h + gj) * w + gi
                tobj.view(-1).scatter_reduce_(0, cell, obj_target, reduce="amax")
                if self.num_classes > 1 or self.cls_neg > 0:
                    tc = torch.full_like(ps[:, 5:], self.cls_neg)
                    tc[torch.arange(len(tcls), device=device), tcls] = self.cls_pos
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tc)
            obj_loss = F.binary_cross_entropy_with_logits(p[..., 4], tobj, reduction="none")
            if gt_boxes is not None:
                weight = self._obj_weight(p, anchors[mask] / stride, scale, gt_boxes, tobj)
                obj_loss = (obj_loss * weight).sum() / weight.sum().clamp(min=1)
            else:
                obj_loss = obj_loss.mean()
            lobj = lobj + obj_loss * self.balance[int(round(stride))]
        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        loss = (lbox + lobj + lcls) * batch
        return loss, {"box": lbox.detach(), "obj": lobj.detach(), "cls": lcls.detach()}

    def _assign(self, targets: torch.Tensor, anchors: torch.Tensor, mask: list[int], stride: float,
                scale: torch.Tensor):
        """Positive samples of one level: batch, anchor, row, col indices, target boxes (cell units), classes."""
        gxy = targets[:, 2:4] * scale                                               # M,2 grid units
        gwh = targets[:, 4:6] * scale
        local_anchors = anchors[mask] / stride                                       # A,2 grid units
        if self.head == "yolov5":
            ratio = gwh[None] / local_anchors[:, None]                               # A,M,2
            match = torch.maximum(ratio, 1 / ratio).amax(2) < self.anchor_t          # A,M
        else:
            iou = wh_iou(gwh * stride, anchors)                                      # M,nA
            best = iou.argmax(1)
            mask_t = torch.tensor(mask, device=targets.device)
            match = (best[None] == mask_t[:, None]) | (iou[:, mask].T > self.anchor_iou_thresh)
        a, m = match.nonzero(as_tuple=True)
        gxy, gwh, t = gxy[m], gwh[m], targets[m]
        if self.head == "yolov5" and len(m):
            a, gxy, gwh, t, offsets = self._with_neighbours(a, gxy, gwh, t, scale)
        else:
            offsets = torch.zeros_like(gxy)
        cell = (gxy - offsets).long()
        gi = cell[:, 0].clamp(0, int(scale[0]) - 1)
        gj = cell[:, 1].clamp(0, int(scale[1]) - 1)
        tbox = torch.cat([gxy - torch.stack([gi, gj], 1), gwh], 1)
        return t[:, 0].long(), a, gj, gi, tbox, t[:, 1].long()

    @staticmethod
    def _with_neighbours(a, gxy, gwh, t, scale):
        """Repeat each match into the two neighbouring cells nearest its centre (YOLOv5)."""
        g = 0.5
        inv = scale - gxy
        left, up = ((gxy % 1 < g) & (gxy > 1)).T
        right, down = ((inv % 1 < g) & (inv > 1)).T
        keep = torch.stack([torch.ones_like(left), left, up, right, down])           # 5,n
        offsets = (NEIGHBOUR_OFFSETS.to(gxy.device)[:, None] * g).expand(-1, len(a), -1)[keep]
        rep = lambda x: x[None].expand(5, *x.shape)[keep]                           # noqa: E731
        return rep(a), rep(gxy), rep(gwh), rep(t), offsets

    @staticmethod
    def _padded_boxes(targets: torch.Tensor, batch: int) -> torch.Tensor:
        """Targets -> [B, K, 4] normalised xyxy per image, padded with empty boxes."""
        img = targets[:, 0].long()
        counts = torch.bincount(img, minlength=batch)
        k = int(counts.max()) if len(img) else 0
        boxes = torch.zeros(batch, max(k, 1), 4, device=targets.device)
        if len(img):
            order = torch.argsort(img, stable=True)
            img = img[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(img), device=targets.device) - starts[img]
            boxes[img, slot] = cxcywh_to_xyxy(targets[order, 2:6])
        return boxes

    def _obj_weight(self, p, local_anchors, scale, gt_boxes, tobj) -> torch.Tensor:
        """1 where the objectness loss counts: positives, and negatives not overlapping a box > ignore_thresh."""
        with torch.no_grad():
            b, a_n, h, w = p.shape[:4]
            xy = (decode_xy(p[..., :2], self.head) + grid_xy(h, w, p.device)) / scale
            wh = decode_wh(p[..., 2:4], local_anchors.view(1, a_n, 1, 1, 2), self.head) / scale
            pred = cxcywh_to_xyxy(torch.cat([xy, wh], -1)).view(b, -1, 4)
            best = box_iou_batched(pred, gt_boxes).amax(-1).view(b, a_n, h, w)
            return ((best <= self.ignore_thresh) | (tobj > 0)).float()

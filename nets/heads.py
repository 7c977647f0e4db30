"""Detection heads: how one style turns raw outputs into boxes and targets into positives.

A head owns everything that differs between YOLOv4 and YOLOv5 - the decode, which anchors and
cells a box is assigned to, the objectness target and the ignore rule - so the loss
(nets/yolo_training.py) and inference (yolo.py) never branch on a style name.
`build_head(config)` is the one place a style name becomes a head.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from nets.yolo import as_model_config
from utils.ops.anchors import used_anchor_indices
from utils.ops.boxes import Cells, box_iou_batched, cxcywh_to_xyxy, flatten_levels

# Darknet's yolov4-tiny.cfg scale_x_y: lets a centre reach the cell border.
V4_XY_SCALE = 1.05
# |t| beyond this is a box 3000x larger or smaller than its anchor; clamping keeps exp finite and non-zero.
V4_MAX_LOG_WH = 8.0
# bound on the (targets x predictions) IoU block of the ignore mask, to cap its memory
IGNORE_CHUNK_ELEMENTS = 2**24
# neighbour cells YOLOv5 also assigns: centre, left, up, right, down
NEIGHBOUR_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing a centre: [M, 2] x [K, 2] -> [M, K]."""
    inter = torch.minimum(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter + 1e-9)


class Head:
    """One head style: decode, per-level candidates, objectness target and ignore rule.

    A head compares equal to its style name ('yolov4' / 'yolov5'), so code that names styles still reads.
    """

    name = ""
    default_obj_iou_ratio = 1.0

    def __init__(self, obj_iou_ratio: float | None = None) -> None:
        self._cache: dict = {}
        self.obj_iou_ratio = self.default_obj_iou_ratio if obj_iou_ratio is None else float(obj_iou_ratio)

    def _const(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Small tensors made once per device: building them from Python data each step would stall on a copy."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @classmethod
    def from_hyp(cls, hyp: dict, read_anchors: list[int] | None = None) -> Head:
        """The head with its style's training settings from `hyp` (defaults where absent); `read_anchors`: the
        anchor indices some level's mask uses."""
        return cls()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        if isinstance(other, Head):
            return type(other) is type(self) and other.settings() == self.settings()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    def settings(self) -> dict:
        """The style's training settings (from hyp)."""
        return {"obj_iou_ratio": self.obj_iou_ratio}

    def decode_xy(self, t_xy: torch.Tensor) -> torch.Tensor:
        """Raw xy logits -> centre offset inside the cell (grid units)."""
        raise NotImplementedError

    def decode_wh(self, t_wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Raw wh logits -> box size, in the units of `anchors`."""
        raise NotImplementedError

    def decode_boxes(self, preds: torch.Tensor, cells: Cells) -> torch.Tensor:
        """Flattened raw predictions [B, N, >=4] -> boxes (cx, cy, w, h) in input pixels [B, N, 4]."""
        xy = (self.decode_xy(preds[..., :2]) + cells.grid) * cells.stride                  # B,N,2
        wh = self.decode_wh(preds[..., 2:4], cells.anchors)                                # B,N,2
        return torch.cat([xy, wh], -1)

    def decode_outputs(self, outputs: list[torch.Tensor], cells: Cells) -> torch.Tensor:
        """Raw outputs -> [B, N, 5+C]: (cx, cy, w, h) in input pixels, objectness and class probabilities."""
        preds = flatten_levels(outputs, cells.anchors_per_level)                           # B,N,5+C
        return torch.cat([self.decode_boxes(preds, cells), preds[..., 4:].sigmoid()], -1)

    def candidates(self, gxy: torch.Tensor, gwh: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                   stride: float, mask: list[int], anchors: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One level's candidates: matched anchors [A,M], cell offsets tried [O,2], offsets usable per box [O,M].

        Boxes in grid units (gxy, gwh [M,2]; valid [M]), the grid size `scale` (w, h) [2], the level's
        stride, its anchor indices `mask` and all anchors [nA,2] in input pixels. An offset is
        subtracted from a box's centre to pick the cell.
        """
        raise NotImplementedError

    def objectness_target(self, box_loss: torch.Tensor) -> torch.Tensor:
        """Objectness target of each candidate [K] from its CIoU loss [K]: (1 - r) + r x the CIoU, r = obj_iou_ratio.

        The CIoU (1 - loss, at most 1) is clamped at 0 and not differentiated: it only says how good a box is.
        """
        iou = (1.0 - box_loss).detach().clamp(0)
        return (1.0 - self.obj_iou_ratio) + self.obj_iou_ratio * iou

    def counted(self, preds: torch.Tensor, cells: Cells, targets: torch.Tensor, valid: torch.Tensor,
                tobj: torch.Tensor, input_shape: tuple[int, int]) -> torch.Tensor:
        """Weight [B,N] of each prediction in the objectness loss: 1 everywhere unless the head ignores some.

        targets [B,K,6] (padding rows hold a harmless box), valid [B,K], tobj [B,N] the objectness targets.
        """
        return torch.ones_like(tobj)


class YoloV4Head(Head):
    """YOLOv4(-tiny): scaled-sigmoid centres, exp sizes; each box to its best-IoU anchor (and any above
    `anchor_iou_thresh`) in the cell holding its centre; objectness target 1 (or IoU-weighted with
    `obj_iou_ratio`), with predictions that already overlap a box by more than `ignore_thresh` left out
    of the objectness loss."""

    name = "yolov4"
    default_obj_iou_ratio = 0.0

    def __init__(self, anchor_iou_thresh: float = 1.0, ignore_thresh: float | None = None,
                 obj_iou_ratio: float | None = None, read_anchors: list[int] | None = None) -> None:
        super().__init__(obj_iou_ratio)
        self.anchor_iou_thresh, self.ignore_thresh = anchor_iou_thresh, ignore_thresh
        self.read_anchors = read_anchors      # anchor indices some level's mask uses (None: all)

    def _unread(self, num_anchors: int, device: torch.device) -> torch.Tensor:
        """[nA] True for the anchors no level reads."""
        unread = torch.ones(num_anchors, dtype=torch.bool, device=device)
        unread[self.read_anchors if self.read_anchors is not None else slice(None)] = False
        return unread

    @classmethod
    def from_hyp(cls, hyp: dict, read_anchors: list[int] | None = None) -> YoloV4Head:
        return cls(hyp.get("anchor_iou_thresh", 1.0), hyp.get("ignore_thresh"), hyp.get("obj_iou_ratio"), read_anchors)

    def settings(self) -> dict:
        return {"anchor_iou_thresh": self.anchor_iou_thresh, "ignore_thresh": self.ignore_thresh, **super().settings()}

    def decode_xy(self, t_xy: torch.Tensor) -> torch.Tensor:
        return t_xy.sigmoid() * V4_XY_SCALE - 0.5 * (V4_XY_SCALE - 1.0)

    def decode_wh(self, t_wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        return t_wh.clamp(-V4_MAX_LOG_WH, V4_MAX_LOG_WH).exp() * anchors

    def candidates(self, gxy, gwh, valid, scale, stride, mask, anchors):
        device = gxy.device
        iou = wh_iou(gwh * stride, anchors)                                                # M,nA
        # the best anchor among those some level reads: a box whose best anchor no mask uses (YOLOv4-tiny's
        # first) would otherwise be assigned nowhere and never trained
        unread = self._const(("unread", anchors.shape[0], device), lambda: self._unread(anchors.shape[0], device))
        iou = iou.masked_fill(unread, -1.0)
        mask_t = self._const(("mask", tuple(mask), device), lambda: torch.tensor(mask, device=device))
        match = (iou.argmax(1)[None] == mask_t[:, None]) | (iou.index_select(1, mask_t).T > self.anchor_iou_thresh)
        offsets = self._const(("no_offset", device), lambda: torch.zeros(1, 2, device=device))
        return match, offsets, valid[None]                                                 # A,M / 1,2 / 1,M

    def counted(self, preds, cells, targets, valid, tobj, input_shape):
        """1 where the objectness loss counts: positives, and negatives not overlapping a box > ignore_thresh.

        Each prediction's best IoU with the boxes of its own image ([B,K] rows), compared image by
        image with no gather, a few images at a time to bound the IoU block's memory.
        """
        if self.ignore_thresh is None:
            return super().counted(preds, cells, targets, valid, tobj, input_shape)
        with torch.no_grad():
            b, n = preds.shape[:2]
            size = self._const(("size", tuple(input_shape), preds.device), lambda: torch.tensor(
                [input_shape[1], input_shape[0]] * 2, device=preds.device, dtype=torch.float32))
            pred = cxcywh_to_xyxy(self.decode_boxes(preds, cells)) / size                  # B,N,4 normalised
            boxes = cxcywh_to_xyxy(targets[..., 2:6])                                      # B,K,4
            valid = valid[..., None]                                                       # B,K,1
            step = max(1, IGNORE_CHUNK_ELEMENTS // (boxes.shape[1] * n))                   # images at a time
            best = torch.cat([(box_iou_batched(boxes[s:s + step], pred[s:s + step]) * valid[s:s + step]).amax(1)
                              for s in range(0, b, step)])                                 # B,N
            return ((best <= self.ignore_thresh) | (tobj > 0)).float()


class YoloV5Head(Head):
    """YOLOv5: centres 2 sigmoid - 0.5, sizes (2 sigmoid)^2 x anchor; a box goes to every anchor whose
    width/height ratio is within `anchor_t`, in its cell and the two nearest neighbouring cells;
    objectness target = the detached IoU (`obj_iou_ratio` 1); nothing ignored."""

    name = "yolov5"
    default_obj_iou_ratio = 1.0

    def __init__(self, anchor_t: float = 4.0, obj_iou_ratio: float | None = None) -> None:
        super().__init__(obj_iou_ratio)
        self.anchor_t = anchor_t

    @classmethod
    def from_hyp(cls, hyp: dict, read_anchors: list[int] | None = None) -> YoloV5Head:
        return cls(hyp.get("anchor_t", 4.0), hyp.get("obj_iou_ratio"))

    def settings(self) -> dict:
        return {"anchor_t": self.anchor_t, **super().settings()}

    def decode_xy(self, t_xy: torch.Tensor) -> torch.Tensor:
        return t_xy.sigmoid() * 2.0 - 0.5

    def decode_wh(self, t_wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        return (t_wh.sigmoid() * 2.0) ** 2 * anchors

    def candidates(self, gxy, gwh, valid, scale, stride, mask, anchors):
        device = gxy.device
        level_anchors = self._const(("level", tuple(mask), device), lambda: anchors[mask])
        local_anchors = level_anchors / stride                                             # A,2 grid units
        ratio = gwh[None] / local_anchors[:, None]                                         # A,M,2
        match = torch.maximum(ratio, 1 / ratio).amax(2) < self.anchor_t                    # A,M
        offsets = self._const(("offsets", device), lambda: NEIGHBOUR_OFFSETS.to(device) * 0.5)
        return match, offsets, neighbours(gxy, scale)                                      # A,M / 5,2 / 5,M


def neighbours(gxy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """YOLOv5's cells: the centre and the two neighbours nearest it -> usable [5, M] (NEIGHBOUR_OFFSETS order)."""
    g = 0.5
    inv = scale - gxy
    left, up = ((gxy % 1 < g) & (gxy > 1)).T
    right, down = ((inv % 1 < g) & (inv > 1)).T
    return torch.stack([torch.ones_like(left), left, up, right, down])


HEADS: dict[str, type[Head]] = {YoloV4Head.name: YoloV4Head, YoloV5Head.name: YoloV5Head}


def build_head(config, hyp: dict | None = None) -> Head:
    """The head a model config (or its checkpoint dict) names, with the training settings of `hyp` if given."""
    config = as_model_config(config)
    name = config.head          # a complete config names its head (default: the family's own)
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name].from_hyp(hyp or {}, used_anchor_indices(config.anchors_mask))

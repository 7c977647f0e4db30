"""Style-free box ops: the flattened prediction layout and its cells, box conversion, IoU, CIoU and NMS.

Decoding raw outputs into boxes is the head's (nets/heads.py): the loss and inference both
decode through it, so training and prediction can never disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def split_level(raw: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """[B, A*(5+C), H, W] -> [B, A, H, W, 5+C] (a view where possible)."""
    b, _, h, w = raw.shape
    return raw.view(b, num_anchors, -1, h, w).permute(0, 1, 3, 4, 2)


def grid_xy(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Cell corner coordinates [H, W, 2] as (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack((xs, ys), dim=-1).float()


def flatten_levels(outputs: list[torch.Tensor], anchors_per_level: list[int]) -> torch.Tensor:
    """Raw outputs of every level -> one float tensor [B, N, 5+C]; cell n of level l is (a * H + y) * W + x."""
    return torch.cat([split_level(raw, a).flatten(1, 3) for raw, a in zip(outputs, anchors_per_level)], 1).float()


@dataclass
class Cells:
    """What every prediction slot of the flattened outputs means: its cell, anchor, stride and level."""

    grid: torch.Tensor      # [N,2] cell corner (x, y) in its level's grid units
    anchors: torch.Tensor   # [N,2] anchor (w, h) in input pixels
    stride: torch.Tensor    # [N,1] input pixels per cell
    level: torch.Tensor     # [N] level index
    offsets: list[int]      # first slot of each level
    shapes: list[tuple[int, int]]  # (H, W) of each level
    anchors_per_level: list[int]

    @classmethod
    def build(cls, shapes: list[tuple[int, int]], level_anchors: list[torch.Tensor], input_height: int,
              device: torch.device) -> Cells:
        grids, anchors, strides, levels, offsets, start = [], [], [], [], [], 0
        for lvl, ((h, w), la) in enumerate(zip(shapes, level_anchors)):
            a = len(la)
            grids.append(grid_xy(h, w, device).view(1, h * w, 2).expand(a, -1, -1).reshape(-1, 2))
            anchors.append(la.to(device).view(a, 1, 2).expand(-1, h * w, -1).reshape(-1, 2))
            strides.append(torch.full((a * h * w, 1), input_height / h, device=device))
            levels.append(torch.full((a * h * w,), lvl, dtype=torch.long, device=device))
            offsets.append(start)
            start += a * h * w
        return cls(torch.cat(grids), torch.cat(anchors), torch.cat(strides), torch.cat(levels), offsets, list(shapes),
                   [len(la) for la in level_anchors])


class CellCache:
    """Cells per (output shapes, device), built once: rebuilding them from Python data each step would stall."""

    def __init__(self, level_anchors: list[torch.Tensor], input_height: int):
        self.level_anchors, self.input_height = level_anchors, input_height
        self._cells: dict = {}

    def __call__(self, outputs: list[torch.Tensor], input_height: int | None = None) -> Cells:
        """The cells of these outputs; `input_height` is the network input's (default: the nominal one)."""
        shapes = [tuple(o.shape[2:]) for o in outputs]
        height = input_height or self.input_height
        key = (tuple(shapes), height, outputs[0].device)
        if key not in self._cells:
            self._cells[key] = Cells.build(shapes, self.level_anchors, height, outputs[0].device)
        return self._cells[key]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), any leading shape.

    Written out rather than torchvision's box_convert: importing torchvision.ops imports torch._dynamo (about
    1.4 s here, more on a cold machine), which training and prediction on CUDA otherwise never need.
    """
    centre, half = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat([centre - half, centre + half], -1)


def box_iou_batched(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of xyxy boxes per batch element: a [B, N, 4], b [B, K, 4] -> [B, N, K].

    `eps` keeps degenerate pairs finite; 0 gives the exact ratio (0/0 = NaN for two empty boxes), for metrics
    whose thresholds are inclusive (an IoU of exactly 0.5 counts at 0.5)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[..., None] + area_b[..., None, :] - inter + eps)


def ciou_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - CIoU of boxes (cx, cy, w, h) [K, 4] x [K, 4] -> [K] (Zheng et al., AAAI 2020).

    CIoU = IoU - centre distance^2 / enclosing diagonal^2 - alpha * v, with v the aspect-ratio
    term 4/pi^2 (atan(w_b/h_b) - atan(w_a/h_a))^2 and alpha = v / (1 - IoU + v), not differentiated.
    Plain arithmetic, no masks: nothing waits for the GPU, so it can run inside a captured graph.
    """
    (acx, acy, aw, ah), (bcx, bcy, bw, bh) = a.unbind(-1), b.unbind(-1)
    ax1, ax2, ay1, ay2 = acx - aw / 2, acx + aw / 2, acy - ah / 2, acy + ah / 2
    bx1, bx2, by1, by2 = bcx - bw / 2, bcx + bw / 2, bcy - bh / 2, bcy + bh / 2
    inter = ((torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
             * (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0))
    # widths from the corners, as the corners define the boxes the IoU sees
    aw, ah, bw, bh = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    iou = inter / (aw * ah + bw * bh - inter + eps)
    diagonal = ((torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)) ** 2
                + (torch.maximum(ay2, by2) - torch.minimum(ay1, by1)) ** 2 + eps)
    centres = (acx - bcx) ** 2 + (acy - bcy) ** 2
    v = (4 / math.pi ** 2) * (torch.atan(bw / (bh + eps)) - torch.atan(aw / (ah + eps))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return 1 - iou + centres / diagonal + alpha * v


# The matrix NMS holds a [B, k, k] overlap matrix. On GPUs the images are suppressed together in rounds of
# NMS_BLOCK candidates each (`blocked_nms`), in groups whose overlap matrices fit MATRIX_NMS_MAX_ELEMENTS (about 50
# images x 1024 candidates); an image leaves once it keeps max_det boxes. Greedy NMS of a score-ordered prefix keeps
# exactly the full answer's boxes from that prefix, so the result is the full answer at a cost set by the boxes
# kept, not by every candidate (an early-epoch model at --conf 0.001 gives thousands an image). On the CPU, beyond
# one round, through torchvision's C++ kernel one image at a time. Not torchvision on GPUs:
# importing it imports torch._dynamo, seconds that stalled the first evaluation of a training run.
MATRIX_NMS_MAX_ELEMENTS = 64 * 1024 * 1024
NMS_BLOCK = 1024
NMS_METHODS = ("auto", "matrix", "blocked", "per_image")


def non_max_suppression(pred: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        max_det: int = 300, multi_label: bool = False,
                        max_candidates: int = 10000, method: str = "auto") -> list[torch.Tensor]:
    """Decoded [B, N, 5+C] -> per image [n, 6] (x1, y1, x2, y2, score, class), score = obj * class prob.

    Per image, its candidates above `conf_thres` (at most `max_candidates`, best first) are suppressed
    greedily within each class, as torchvision's batched_nms does. `method` "per_image" makes one
    torchvision batched_nms call per image; "matrix" does every image at once (`matrix_nms`, the same result,
    a few GPU waits per batch instead of one per image, memory growing with the square of the candidates);
    "blocked" does every image at once in rounds of NMS_BLOCK candidates (`blocked_nms`, the same result in bounded
    memory); "auto" is "blocked" on CUDA and on the CPU for up to NMS_BLOCK candidates an image, else torchvision
    per image (`resolved_nms_method`).
    Reading the candidate counts is one wait for the GPU; the candidates are a prefix of each image's sorted scores.
    `multi_label` keeps every class above threshold per box, as COCO-style evaluation expects;
    otherwise only each box's best class.
    """
    if method not in NMS_METHODS:
        raise ValueError(f"NMS method {method!r}: choose one of {', '.join(NMS_METHODS)}")
    scores = pred[..., 5:] * pred[..., 4:5]                     # B,N,C
    boxes = cxcywh_to_xyxy(pred[..., :4])                       # B,N,4
    if multi_label:
        flat = scores.flatten(1)                                # B,N*C
        top, idx = flat.topk(min(max_candidates, flat.shape[1]), dim=1)
        box_idx, cls = idx // scores.shape[2], idx % scores.shape[2]
    else:
        best, best_cls = scores.max(-1)                         # B,N
        top, box_idx = best.topk(min(max_candidates, best.shape[1]), dim=1)
        cls = best_cls.gather(1, box_idx)
    cand_boxes = boxes.gather(1, box_idx[..., None].expand(-1, -1, 4))
    det = torch.cat([cand_boxes, top[..., None], cls[..., None].to(top.dtype)], -1)   # B,k,6, by score descending
    counts = (top > conf_thres).sum(1).tolist()
    k = max(counts, default=0)
    if method == "matrix":
        keep = matrix_nms(det[:, :k], counts, iou_thres)                                 # B,k
        return [det[image, :n][keep[image, :n]][:max_det] for image, n in enumerate(counts)]
    if resolved_nms_method(method, det.device, k) == "blocked":
        kept = blocked_nms(det, counts, iou_thres, max_det)
        sizes = [indices.shape[0] for indices in kept]
        images = torch.repeat_interleave(torch.arange(len(kept), device=det.device),
                                         torch.tensor(sizes, device=det.device), output_size=sum(sizes))
        return list(det[images, torch.cat(kept)].split(sizes))  # one gather for the batch, not one per image
    from torchvision.ops import batched_nms  # noqa: PLC0415 (lazy: see cxcywh_to_xyxy)
    out = []
    for image, n in enumerate(counts):
        d = det[image, :n]
        kept = batched_nms(d[:, :4].float(), d[:, 4].float(), d[:, 5].long(), iou_thres)
        out.append(d[kept[:max_det]])                           # kept is sorted by score, descending
    return out


def resolved_nms_method(method: str, device: torch.device, candidates: int) -> str:
    """What "auto" means on a device for at most `candidates` an image: "blocked" on CUDA (no torchvision import,
    no wait per image); on the CPU "blocked" too when they fit one round (NMS_BLOCK: a prediction's few dozen),
    which spares the import of torchvision (it imports torch._dynamo: 1.3-2 s, half of predicting one image
    on the development machine), else "per_image" (torchvision's C++ kernel: an evaluation at --conf 0.001 with
    thousands of candidates an image, 0.06 s against 1.4-1.6 s of blocked rounds there). Any other method
    stands."""
    if method != "auto":
        return method
    return "blocked" if device.type == "cuda" or candidates <= NMS_BLOCK else "per_image"


def _fitting_groups(counts: list[int], kept: list[int] | None = None) -> list[list[int]]:
    """Consecutive images (positions in `counts`) grouped so each group's overlap matrices, [images, k, k] among
    its candidates and [images, k, kept] against the boxes it kept before, fit MATRIX_NMS_MAX_ELEMENTS (an image
    too large for it alone is a group of one)."""
    kept = kept or [0] * len(counts)
    groups, current, k, m = [], [], 0, 0
    for image, (n, done) in enumerate(zip(counts, kept)):
        if current and (len(current) + 1) * max(k, n) * (max(k, n) + max(m, done)) > MATRIX_NMS_MAX_ELEMENTS:
            groups.append(current)
            current, k, m = [], 0, 0
        current.append(image)
        k, m = max(k, n), max(m, done)
    return groups + [current] if current else groups


def blocked_nms(det: torch.Tensor, counts: list[int], iou_thres: float, max_det: int,
                block: int | None = None) -> list[torch.Tensor]:
    """Greedy per-class NMS of every image of det [B, k, 6] (sorted by score, the first counts[b] valid) -> each
    image's kept indices in score order, at most max_det.

    Rounds of `block` candidates: each takes the next block of every image still short of max_det boxes, drops
    the candidates overlapping a box of their class kept in an earlier round, and settles the rest by matrix_nms,
    images grouped so the overlap matrices fit (`_fitting_groups`). Two waits for the GPU per group and round
    beside matrix_nms's passes; memory is set by the block, not by the candidates; the answer is greedy NMS's
    (a dropped box never suppresses another, and a prefix's greedy answer is the full answer's part of it).
    """
    block = block or NMS_BLOCK
    iou_thres = _float32_below(iou_thres)
    nothing = torch.empty(0, dtype=torch.long, device=det.device)   # one shared empty: not a tensor call per image
    kept = [nothing] * len(counts)
    taken = [0] * len(counts)                     # len(kept[image]), kept as ints: no tensor call to read it
    for start in range(0, max(counts, default=0), block):
        active = [image for image, n in enumerate(counts) if n > start and taken[image] < max_det]
        sizes = [min(block, counts[image] - start) for image in active]
        for group in _fitting_groups(sizes, [taken[image] for image in active]):
            images, lengths = [active[j] for j in group], [sizes[j] for j in group]
            candidates = det[images, start:start + max(lengths)]                                  # G,k,6
            valid = _prefix_mask(lengths, candidates.shape[1], det.device)                        # G,k
            if any(taken[image] for image in images):
                earlier = torch.nn.utils.rnn.pad_sequence([kept[image] for image in images], batch_first=True)
                earlier_valid = _prefix_mask([taken[image] for image in images], earlier.shape[1], det.device)
                earlier = det[torch.tensor(images, device=det.device)[:, None], earlier]           # G,m,6
                hit = ((box_iou_batched(candidates[..., :4].float(), earlier[..., :4].float()) > iou_thres)
                       & (candidates[..., 5, None] == earlier[:, None, :, 5]) & earlier_valid[:, None])  # G,k,m
                valid &= ~hit.any(2)
            keep = _matrix_keep(candidates, valid, iou_thres)                                     # G,k
            per_image = keep.sum(1).tolist()
            columns = keep.nonzero()[:, 1] + start              # row by row, each row's in score order
            for image, new, n in zip(images, columns.split(per_image), per_image):
                kept[image] = torch.cat([kept[image], new]) if taken[image] else new
                taken[image] += n
    return [indices[:max_det] if n > max_det else indices for indices, n in zip(kept, taken)]


def _float32_below(threshold: float) -> float:
    """The largest float32 not above `threshold`: a float32 IoU exceeds it exactly when it exceeds `threshold`
    itself, as torchvision compares (a float32 against a double); a plain `iou > 0.6` would round 0.6 up."""
    value = float(np.float32(threshold))
    return value if value <= threshold else float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def _prefix_mask(lengths: list[int], k: int, device: torch.device) -> torch.Tensor:
    """[len(lengths), k] bool: row b is true at its first lengths[b] places."""
    return torch.arange(k, device=device)[None] < torch.tensor(lengths, device=device)[:, None]


def matrix_nms(det: torch.Tensor, counts: list[int], iou_thres: float) -> torch.Tensor:
    """Greedy per-class NMS of every image at once: det [B, k, 6] sorted by score, the first counts[b] valid
    -> keep mask [B, k].

    Box i survives when no *surviving* earlier box of its class overlaps it above `iou_thres`. That rule
    fixes the mask one index at a time, so iterating it from "all kept" reaches greedy NMS's answer exactly
    (Cluster-NMS, Zheng et al. 2020); dense scenes need a handful of passes, each one wait for the GPU.
    """
    return _matrix_keep(det, _prefix_mask(counts, det.shape[1], det.device), _float32_below(iou_thres))


def _matrix_keep(det: torch.Tensor, valid: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """matrix_nms with the candidates given by a mask [B, k]: an invalid one is neither kept nor suppresses."""
    k = det.shape[1]
    boxes, cls = det[..., :4].float(), det[..., 5]
    earlier = torch.ones(k, k, dtype=torch.bool, device=det.device).triu(1)                  # [j, i]: j < i
    suppresses = ((box_iou_batched(boxes, boxes) > iou_thres) & (cls[:, :, None] == cls[:, None, :])
                  & earlier & valid[:, :, None])                                             # B,k(j),k(i)
    keep = valid
    for _ in range(k + 1):          # at most k passes; the check below ends it as soon as nothing changes
        updated = valid & ~(suppresses & keep[:, :, None]).any(1)
        if torch.equal(updated, keep):
            break
        keep = updated
    return keep

"""Detection metrics: VOC mAP@0.5 (all-point), P/R/F1 at a score threshold, COCO mAP via pycocotools.

Names: map50 / map50_95 are always COCO (101-point, as pycocotools; utils/ops/coco_map.py computes the same
without it), a _voc suffix always VOC all-point AP.

Inputs, one entry per image and in the same order:
  detections     numpy [N,6] = (x1, y1, x2, y2, score, class) in original-image pixels
  ground_truths  GroundTruth (or a dict with the same keys)

Boxes use continuous coordinates: width = x2 - x1, with no "+1 pixel" as in the
original VOC devkit. The model predicts continuous boxes, and pycocotools uses the
same convention, so VOC and COCO numbers stay comparable.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from utils.ops.boxes import box_iou_batched


@dataclass
class GroundTruth:
    """Annotated objects of one image: xyxy pixel boxes, class indices, difficult flags, size and id."""

    boxes: np.ndarray  # float32 [M,4] xyxy pixels
    labels: np.ndarray  # int64 [M]
    difficult: np.ndarray  # bool [M]
    height: int
    width: int
    image_id: str
    file_name: str = ""  # the image file's relative path, for COCO tools; empty: the image id is used


# ----------------------------------------------------------------------------- input helpers


def _field(gt: GroundTruth | dict, name: str) -> Any:
    return gt[name] if isinstance(gt, dict) else getattr(gt, name)


def _gt_arrays(gt: GroundTruth | dict, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(_field(gt, "boxes"), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(_field(gt, "labels"), dtype=np.int64).reshape(-1)
    difficult = _field(gt, "difficult") if not isinstance(gt, dict) else gt.get("difficult")
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool).reshape(-1)
    if not (len(boxes) == len(labels) == len(difficult)):
        raise ValueError(f"ground truth {_field(gt, 'image_id')!r}: boxes, labels and difficult differ in length")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"ground truth {_field(gt, 'image_id')!r}: label outside 0..{num_classes - 1}")
    return boxes, labels, difficult


def _det_array(dets: np.ndarray | None, num_classes: int | None = None) -> np.ndarray:
    dets = np.zeros((0, 6)) if dets is None else np.asarray(dets, dtype=np.float64).reshape(-1, 6)
    if num_classes is not None and len(dets):
        classes = np.rint(dets[:, 5])
        if classes.min() < 0 or classes.max() >= num_classes:
            raise ValueError(f"detection class outside 0..{num_classes - 1}")
    return dets


def _check_lengths(detections: Sequence, ground_truths: Sequence) -> None:
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection arrays for {len(ground_truths)} images")


# ----------------------------------------------------------------------------- VOC matching


class _Matches(NamedTuple):
    scores: np.ndarray  # [D] every detection of the set, sorted by score (descending)
    classes: np.ndarray  # [D] int64
    tp: np.ndarray  # [D] bool, true positive
    ignored: np.ndarray  # [D] bool, matched a difficult object: neither TP nor FP
    num_pos: np.ndarray  # [C] non-difficult objects per class


class _Candidates(NamedTuple):
    scores: np.ndarray  # [D] every detection of the set, sorted by score (descending)
    classes: np.ndarray  # [D] int64
    best_key: np.ndarray  # [D] set-wide index of the highest-IoU object of the same class (-1: none)
    best_iou: np.ndarray  # [D] its IoU (-1: none)
    best_difficult: np.ndarray  # [D] bool, that object is difficult
    num_pos: np.ndarray  # [C] non-difficult objects per class


def _candidates(detections: Sequence, ground_truths: Sequence, num_classes: int) -> _Candidates:
    """Each detection's highest-IoU object of its class: one IoU pass, whatever the thresholds."""
    _check_lengths(detections, ground_truths)
    num_pos = np.zeros(num_classes, np.int64)
    scores, classes, keys, ious, diffs = [], [], [], [], []
    gt_offset = 0  # makes GT indices unique over the whole set
    for dets, gt in zip(detections, ground_truths):
        dets = _det_array(dets, num_classes)
        boxes, labels, difficult = _gt_arrays(gt, num_classes)
        num_pos += np.bincount(labels[~difficult], minlength=num_classes)
        det_cls = np.rint(dets[:, 5]).astype(np.int64)
        best_iou = np.full(len(dets), -1.0)
        best_gt = np.zeros(len(dets), np.int64)
        if len(dets) and len(boxes):
            iou = box_iou_batched(torch.from_numpy(dets[None, :, :4]), torch.from_numpy(boxes[None]), eps=0)[0].numpy()
            iou = np.nan_to_num(iou, nan=0.0)  # degenerate boxes: 0/0
            iou = np.where(det_cls[:, None] == labels[None, :], iou, -1.0)  # other classes never match
            best_gt, best_iou = iou.argmax(1), iou.max(1)
        # The devkit takes the highest-IoU object whether or not it is already claimed,
        # so the candidate does not depend on the order (or the threshold) and is found for all at once.
        keys.append(np.where(best_iou >= 0, best_gt + gt_offset, -1))
        ious.append(best_iou)
        diffs.append(difficult[best_gt] if len(boxes) else np.zeros(len(dets), bool))
        scores.append(dets[:, 4])
        classes.append(det_cls)
        gt_offset += len(boxes)

    def cat(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    scores, classes = cat(scores, np.float64), cat(classes, np.int64)
    # One order over the whole set; its restriction to one class is the devkit's per-class order.
    order = np.argsort(-scores, kind="stable")
    return _Candidates(scores[order], classes[order], cat(keys, np.int64)[order], cat(ious, np.float64)[order],
                       cat(diffs, bool)[order], num_pos)


def _claim(c: _Candidates, iou_threshold: float) -> _Matches:
    """TP / ignored flags at one IoU threshold with the VOC devkit rules."""
    hit = c.best_iou >= iou_threshold
    ignored = hit & c.best_difficult
    gt_key = np.where(hit & ~ignored, c.best_key, -1)
    # The first detection (highest score) to reach an object claims it; later ones are duplicates: FP.
    tp = np.zeros(len(c.scores), bool)
    candidates = np.flatnonzero(gt_key >= 0)
    _, first = np.unique(gt_key[candidates], return_index=True)
    tp[candidates[first]] = True
    return _Matches(c.scores, c.classes, tp, ignored, c.num_pos)


def _match(detections: Sequence, ground_truths: Sequence, num_classes: int, iou_threshold: float) -> _Matches:
    """Match all detections to ground truth with the VOC devkit rules."""
    return _claim(_candidates(detections, ground_truths, num_classes), iou_threshold)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope of a PR curve (VOC2010+ all-point interpolation)."""
    r = np.concatenate(([0.0], np.asarray(recall, np.float64), [1.0]))
    p = np.concatenate(([0.0], np.asarray(precision, np.float64), [0.0]))
    # Envelope: precision at recall r is the best precision at any recall >= r.
    p = np.maximum.accumulate(p[::-1])[::-1]
    # Step curve: each recall increment is weighted by the envelope just after it.
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))


def _ap_per_class(m: _Matches, num_classes: int) -> np.ndarray:
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if m.num_pos[c] == 0:
            continue
        tp = m.tp[(m.classes == c) & ~m.ignored]
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(~tp)
        ap[c] = voc_ap(tp_cum / m.num_pos[c], tp_cum / np.maximum(tp_cum + fp_cum, 1))
    return ap


def _prf_per_class(m: _Matches, num_classes: int, score_threshold: float) -> tuple[np.ndarray, ...]:
    # Detections below the threshold come after all above it in score order, so they
    # never take an object from one above it: filtering after matching is exact.
    keep = (m.scores >= score_threshold) & ~m.ignored
    tp = np.bincount(m.classes[keep & m.tp], minlength=num_classes)
    fp = np.bincount(m.classes[keep & ~m.tp], minlength=num_classes)
    has_gt = m.num_pos > 0
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = tp / np.maximum(m.num_pos, 1)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    nan = np.full(num_classes, np.nan)
    return tuple(np.where(has_gt, x, nan) for x in (precision, recall, f1))


def evaluate_voc(
    detections: Sequence[np.ndarray], ground_truths: Sequence[GroundTruth], num_classes: int, iou_threshold: float = 0.5
) -> np.ndarray:
    """Per-class VOC AP (all-point) at one IoU threshold; NaN for classes without non-difficult objects."""
    return _ap_per_class(_match(detections, ground_truths, num_classes, iou_threshold), num_classes)


def precision_recall_f1(
    detections: Sequence[np.ndarray],
    ground_truths: Sequence[GroundTruth],
    num_classes: int,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 of the detections scoring >= score_threshold (NaN without GT)."""
    m = _match(detections, ground_truths, num_classes, iou_threshold)
    return _prf_per_class(m, num_classes, score_threshold)


# ----------------------------------------------------------------------------- COCO (pycocotools)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:4] - boxes[:, :2]], axis=1)


def coco_ground_truth(ground_truths: Sequence[GroundTruth], class_names: Sequence[str]) -> dict:
    """COCO-format ground truth: image ids 1..N (file_name: the image's relative path), category id = class index + 1."""
    images, annotations = [], []
    for i, gt in enumerate(ground_truths, start=1):
        # Images without objects are listed too: detections on them are false positives.
        file_name = (gt.get("file_name") if isinstance(gt, dict) else gt.file_name) or _field(gt, "image_id")
        images.append({"id": i, "file_name": str(file_name),
                       "height": int(_field(gt, "height")), "width": int(_field(gt, "width"))})
        boxes, labels, difficult = _gt_arrays(gt, len(class_names))
        for box, label, diff in zip(_xywh(boxes), labels, difficult):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i,
                "category_id": int(label) + 1,
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                # pycocotools has no "difficult": COCOeval sets each object's ignore flag
                # from iscrowd, so iscrowd=1 makes detections on it neither TP nor FP and
                # keeps it out of the positives, as VOC does with difficult objects.
                "iscrowd": int(bool(diff)),
            })
    categories = [{"id": k + 1, "name": name, "supercategory": "none"} for k, name in enumerate(class_names)]
    return {"info": {"description": "ground truth"}, "images": images,
            "annotations": annotations, "categories": categories}


def coco_detections(detections: Sequence[np.ndarray]) -> list[dict]:
    """Detections in COCO results format; image i (0-based) gets image_id i + 1."""
    results = []
    for i, dets in enumerate(detections, start=1):
        dets = _det_array(dets)
        for box, score, cls in zip(_xywh(dets[:, :4]), dets[:, 4], dets[:, 5]):
            results.append({"image_id": i, "category_id": int(round(cls)) + 1,
                            "bbox": [float(v) for v in box], "score": float(score)})
    return results


def evaluate_coco(gt_dict: dict, det_list: list[dict]) -> dict:
    """COCO bbox mAP@[.5:.95] and mAP@.5 plus per-class APs (indexed by category id - 1) via pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt_dict)  # COCOeval writes an "ignore" key into each object
        coco_gt.createIndex()
        if det_list:
            coco_dt = coco_gt.loadRes([dict(d) for d in det_list])  # loadRes adds keys to each dict
        else:  # loadRes fails on an empty list; an empty result set evaluates to AP 0
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                               "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    # precision: [IoU thresholds, recall points, classes, area ranges, max dets]; -1 = no objects.
    # Area range 0 is "all" and the last max-dets entry is 100, as in stats[0] and stats[1].
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    num_classes = len(gt_dict["categories"])
    ap50_95, ap50 = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k]
        if (p > -1).any():
            ap50_95[cat_id - 1] = p[p > -1].mean()
            ap50[cat_id - 1] = p[0][p[0] > -1].mean()  # iouThrs[0] == 0.5
    stats = [float(s) if s >= 0 else math.nan for s in coco_eval.stats[:2]]  # -1: no objects at all
    return {"map50_95": stats[0], "map50": stats[1], "per_class_ap50_95": ap50_95, "per_class_ap50": ap50}


# ----------------------------------------------------------------------------- everything at once


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def evaluate(
    detections: Sequence[np.ndarray],
    ground_truths: Sequence[GroundTruth],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
) -> tuple[dict, dict, list[dict]]:
    """All metrics as a JSON-ready summary, plus the COCO ground-truth dict and detection list."""
    num_classes = len(class_names)
    m = _match(detections, ground_truths, num_classes, iou_threshold)
    ap_voc = _ap_per_class(m, num_classes)
    precision, recall, f1 = _prf_per_class(m, num_classes, score_threshold)
    coco_gt, coco_dets = coco_ground_truth(ground_truths, class_names), coco_detections(detections)
    coco = evaluate_coco(coco_gt, coco_dets)

    per_class = {}
    for c, name in enumerate(class_names):
        # A class without (non-difficult) objects has no AP: None everywhere, left out of the means.
        has_gt = m.num_pos[c] > 0
        values = (ap_voc[c], coco["per_class_ap50"][c], coco["per_class_ap50_95"][c], precision[c], recall[c], f1[c])
        keys = ("ap50_voc", "ap50", "ap50_95", "precision", "recall", "f1")
        per_class[name] = {k: _json_float(v) if has_gt else None for k, v in zip(keys, values)}
        per_class[name]["num_gt"] = int(m.num_pos[c])
    summary = {
        "map50_voc": _mean(ap_voc),
        "map50": _json_float(coco["map50"]),
        "map50_95": _json_float(coco["map50_95"]),
        "precision": _mean(precision),
        "recall": _mean(recall),
        "f1": _mean(f1),
        "num_gt": int(m.num_pos.sum()),
        "num_images": len(ground_truths),
        "score_threshold": float(score_threshold),
        "iou_threshold": float(iou_threshold),
        "per_class": per_class,
    }
    return summary, coco_gt, coco_dets


def format_table(summary: dict, class_names: Sequence[str]) -> str:
    """Plain-text per-class table (GT count, AP50 VOC/COCO, AP50-95, P, R, F1) with an "all" row."""
    header = ("Class", "GT", "AP50(VOC)", "AP50", "AP50-95", "P", "R", "F1")
    keys = ("ap50_voc", "ap50", "ap50_95", "precision", "recall", "f1")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = [[name, str(summary["per_class"][name]["num_gt"])] + [fmt(summary["per_class"][name][k]) for k in keys]
            for name in class_names]
    all_keys = ("map50_voc", "map50", "map50_95", "precision", "recall", "f1")
    rows.append(["all", str(summary["num_gt"])] + [fmt(summary[k]) for k in all_keys])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])

"""COCO bbox mAP@0.5 and mAP@[.5:.95] in numpy, equal to pycocotools' COCOeval but fast enough for every epoch.

Same inputs as utils.ops.metrics (one detection array and one GroundTruth per image, same order) and the same
mapping to COCO as utils.ops.metrics.coco_ground_truth: difficult objects are crowd regions (iscrowd=1).
COCOeval's rules reproduced here (pycocotools 2.0, iouType "bbox", area range "all", maxDets 100):
  * matching is per image and category; detections sorted by score (stable) and cut to the best 100
    per image *and category*;
  * IoU with a crowd object is intersection / detection area, and a crowd object can be matched any
    number of times; a detection takes a regular object if it can, else an ignored one, and a
    detection matched to an ignored object is neither TP nor FP;
  * at each threshold a detection takes the unmatched object of highest IoU >= threshold (ties: the
    later object, ignored ones ordered last);
  * per category the matches of all images are sorted by score (stable, images in order), precision
    is made monotone and read at 101 recall points (searchsorted "left", 0 past the last recall);
  * a category without non-ignored objects has no AP (-1 in COCOeval) and stays out of the mean.
The VOC matching in utils.ops.metrics (best object whether or not it is taken, IoU over the union for
difficult objects too, no per-image cap) is a different rule, so it is not reused here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from utils.ops.metrics import GroundTruth, _check_lengths, _det_array, _gt_arrays, _xywh

# Built as COCOeval's Params builds them, so thresholds compare bit for bit (0.9 is 0.8999999999999999).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETS = 100
AREA_ALL = (0.0, 1e5**2)  # COCOeval's "all" range: boxes of negative area fall outside it


def _pair_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of row-wise pairs of xywh boxes, with the same floating-point steps as pycocotools' bbIou."""
    # x + w rather than the original x2: pycocotools only sees xywh, and thresholds are hit exactly.
    w = np.minimum(d[:, 0] + d[:, 2], g[:, 0] + g[:, 2]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 1] + d[:, 3], g[:, 1] + g[:, 3]) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    det_area, gt_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd, det_area, det_area + gt_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((w > 0) & (h > 0), inter / np.where(union != 0, union, 1.0), 0.0)


def _flatten(detections: Sequence, ground_truths: Sequence, num_classes: int) -> tuple[np.ndarray, ...]:
    """Every detection and object of the set in flat arrays, tagged with its image index."""
    _check_lengths(detections, ground_truths)
    d_img, d_rows, g_img, g_box, g_lab, g_diff = [], [], [], [], [], []
    for i, (dets, gt) in enumerate(zip(detections, ground_truths)):
        dets = _det_array(dets, num_classes)
        boxes, labels, difficult = _gt_arrays(gt, num_classes)
        d_img.append(np.full(len(dets), i, np.int64))
        d_rows.append(dets)
        g_img.append(np.full(len(boxes), i, np.int64))
        g_box.append(boxes)
        g_lab.append(labels)
        g_diff.append(difficult)
    return (_cat(d_img, np.int64), _cat(d_rows, np.float64, (0, 6)), _cat(g_img, np.int64),
            _cat(g_box, np.float64, (0, 4)), _cat(g_lab, np.int64), _cat(g_diff, bool))


def _cat(parts: list, dtype, empty_shape: tuple = (0,)) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """For sorted keys: the index of the first element with each element's key."""
    if not len(keys):
        return np.zeros(0, np.int64)
    first = np.r_[True, keys[1:] != keys[:-1]]
    return np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))


def _match(d_key: np.ndarray, d_box: np.ndarray, g_key: np.ndarray, g_box: np.ndarray, crowd: np.ndarray,
           ignore: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching at every threshold: (matched, matched to an ignored object), each [T, D].

    Detections must be sorted by group key (image, category) then score; objects by key then COCO order.
    """
    num_t, num_d, num_g = len(thresholds), len(d_key), len(g_key)
    matched, matched_ignored = np.zeros((num_t, num_d), bool), np.zeros((num_t, num_d), bool)
    # Every (detection, object) pair of the same image and category: the objects of a key are one run.
    lo, hi = np.searchsorted(g_key, d_key, "left"), np.searchsorted(g_key, d_key, "right")
    counts = hi - lo
    pair_det = np.repeat(np.arange(num_d), counts)
    pair_gt = lo[pair_det] + np.arange(len(pair_det)) - np.repeat(np.cumsum(counts) - counts, counts)
    iou = _pair_iou(d_box[pair_det], g_box[pair_gt], crowd[pair_gt])
    # COCOeval skips an object when iou < min(t, 1 - 1e-10); pairs below every threshold never match.
    thr = np.minimum(thresholds, 1 - 1e-10)
    keep = iou >= thr.min()
    pair_det, pair_gt, iou = pair_det[keep], pair_gt[keep], iou[keep]
    if not len(pair_det):
        return matched, matched_ignored

    # Candidate pairs padded to [detections with a candidate, W]; the pad points at a dummy object.
    cand_det, first, per_det = np.unique(pair_det, return_index=True, return_counts=True)
    width = int(per_det.max())
    col = np.arange(len(pair_det)) - np.repeat(first, per_det)
    row = np.repeat(np.arange(len(cand_det)), per_det)
    cand_gt = np.full((len(cand_det), width), num_g, np.int64)
    cand_iou = np.full((len(cand_det), width), -1.0)
    cand_gt[row, col], cand_iou[row, col] = pair_gt, iou
    crowd_x, ignore_x = np.r_[crowd, False], np.r_[ignore, False]
    taken = np.zeros((num_t, num_g + 1), bool)

    # A detection's match depends only on earlier detections of its own image and category, so the
    # k-th candidate of every group is matched at once: the loop runs (most candidates of a group) times.
    keys = d_key[cand_det]
    rank = np.arange(len(cand_det)) - _group_starts(keys)
    order = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[order], np.arange(rank.max() + 2))
    for k in range(rank.max() + 1):
        rows = order[bounds[k]:bounds[k + 1]]
        g, io = cand_gt[rows], cand_iou[rows]  # [A, W]
        avail = (io[None] >= thr[:, None, None]) & (~taken[:, g] | crowd_x[g][None])  # [T, A, W]
        regular = avail & ~ignore_x[g][None]
        # A regular object beats any ignored one; only without one may an ignored object be taken.
        choice = np.where(regular.any(-1, keepdims=True), regular, avail)
        score = np.where(choice, io[None], -1.0)
        last_best = width - 1 - np.argmax(score[..., ::-1], axis=-1)  # COCOeval replaces on iou >= best
        chosen = np.take_along_axis(np.broadcast_to(g, score.shape), last_best[..., None], -1)[..., 0]
        ok = choice.any(-1)  # [T, A]
        t_idx, a_idx = np.nonzero(ok)
        taken[t_idx, chosen[t_idx, a_idx]] = True
        dets = cand_det[rows]
        matched[:, dets] = ok
        matched_ignored[:, dets] = ok & ignore_x[chosen]
    return matched, matched_ignored


@dataclass
class CocoMatches:
    """Per-detection COCO outcomes, fixed once matched: a resample of images only re-weights them.

    Matching is per image, so whether a detection is a true or false positive does not depend on which other
    images are in the set; only the per-class accumulation does. Detections are in accumulation order
    (class, then score descending, then image, then rank in the image); ignored ones are neither tp nor fp.
    """

    tps: np.ndarray        # [T, D] bool
    fps: np.ndarray        # [T, D] bool
    det_image: np.ndarray  # [D] image index of each detection
    bounds: np.ndarray     # [K + 1] each class's slice of the detections
    positives: np.ndarray  # [N, K] non-ignored objects per image and class


def coco_matches(
    detections: Sequence[np.ndarray], ground_truths: Sequence[GroundTruth], num_classes: int,
    max_dets: int = MAX_DETS,
) -> CocoMatches:
    """COCOeval's matching of every detection of the set (area "all", maxDets max_dets)."""
    d_img, dets, g_img, g_box, g_lab, g_diff = _flatten(detections, ground_truths, num_classes)
    d_cls = np.rint(dets[:, 5]).astype(np.int64)
    d_score, d_box = dets[:, 4], _xywh(dets[:, :4])
    g_box = _xywh(g_box)
    g_area = g_box[:, 2] * g_box[:, 3]
    ignore = g_diff | (g_area < AREA_ALL[0]) | (g_area > AREA_ALL[1])
    positives = np.zeros((len(ground_truths), num_classes), np.int64)
    np.add.at(positives, (g_img[~ignore], g_lab[~ignore]), 1)

    # Per (image, category): score order, ties kept in input order (COCOeval's mergesort), best max_dets.
    d_key, g_key = d_img * num_classes + d_cls, g_img * num_classes + g_lab
    order = np.lexsort((np.arange(len(d_key)), -d_score, d_key))
    d_key, d_cls, d_score, d_box, d_img = d_key[order], d_cls[order], d_score[order], d_box[order], d_img[order]
    d_rank = np.arange(len(d_key)) - _group_starts(d_key)
    keep = d_rank < max_dets
    d_key, d_cls, d_score, d_box, d_img, d_rank = (x[keep] for x in (d_key, d_cls, d_score, d_box, d_img, d_rank))
    # Objects: COCOeval puts the ignored ones of an image and category last, otherwise in input order.
    g_order = np.lexsort((np.arange(len(g_key)), ignore, g_key))
    g_key, g_box, crowd, ignore, g_lab = (x[g_order] for x in (g_key, g_box, g_diff, ignore, g_lab))

    matched, matched_ignored = _match(d_key, d_box, g_key, g_box, crowd, ignore, IOU_THRESHOLDS)
    d_area = d_box[:, 2] * d_box[:, 3]
    outside = (d_area < AREA_ALL[0]) | (d_area > AREA_ALL[1])
    dt_ignore = matched_ignored | (~matched & outside[None])
    tps, fps = matched & ~dt_ignore, ~matched & ~dt_ignore

    # Per category over all images: score order, ties by image then by the per-image order.
    acc = np.lexsort((d_rank, d_img, -d_score, d_cls))
    return CocoMatches(tps[:, acc], fps[:, acc], d_img[acc], np.searchsorted(d_cls[acc], np.arange(num_classes + 1)),
                       positives)


def precision_from_matches(m: CocoMatches, weights: np.ndarray | None = None) -> np.ndarray:
    """COCOeval's precision[T, 101, K] of the matched set, or of a resample: weights[i] = copies of image i.

    A resample with image i taken w times equals COCOeval on a set holding w adjacent copies of image i.
    """
    num_t, num_k = m.tps.shape[0], len(m.bounds) - 1
    w_img = np.ones(len(m.positives)) if weights is None else np.asarray(weights, float)
    num_pos = (w_img[:, None] * m.positives).sum(0)
    w_det = w_img[m.det_image]
    precision = -np.ones((num_t, len(RECALL_POINTS), num_k))
    for c in np.flatnonzero(num_pos):
        lo, hi = m.bounds[c], m.bounds[c + 1]
        w = w_det[lo:hi]
        tp_sum = np.cumsum(m.tps[:, lo:hi] * w, axis=1)
        fp_sum = np.cumsum(m.fps[:, lo:hi] * w, axis=1)
        if weights is not None:      # images left out of a resample add no detections
            present = w > 0
            tp_sum, fp_sum = tp_sum[:, present], fp_sum[:, present]
        nd = tp_sum.shape[1]
        precision[:, :, c] = 0.0
        if not nd:
            continue
        rc = tp_sum / num_pos[c]
        pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))  # COCOeval's formula, kept for bitwise equality
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # best precision at this recall or beyond
        for t in range(num_t):
            idx = np.searchsorted(rc[t], RECALL_POINTS, side="left")
            precision[t, :, c] = np.where(idx < nd, pr[t, np.minimum(idx, nd - 1)], 0.0)
    return precision


def coco_precision(
    detections: Sequence[np.ndarray], ground_truths: Sequence[GroundTruth], num_classes: int,
    max_dets: int = MAX_DETS,
) -> np.ndarray:
    """COCOeval's precision[T, 101, K] (area "all", maxDets max_dets); -1 for classes without objects."""
    return precision_from_matches(coco_matches(detections, ground_truths, num_classes, max_dets))


def mean_ap(precision: np.ndarray) -> tuple[float, float]:
    """(map50, map50_95) of a precision[T, 101, K] array, as COCOeval.summarize; NaN without objects."""
    valid, valid50 = precision > -1, precision[0] > -1
    map50_95 = float(precision[valid].mean()) if valid.any() else math.nan
    map50 = float(precision[0][valid50].mean()) if valid50.any() else math.nan
    return map50, map50_95


def coco_map(
    detections: Sequence[np.ndarray], ground_truths: Sequence[GroundTruth], num_classes: int,
    max_dets: int = MAX_DETS,
) -> dict:
    """COCO bbox map50 and map50_95 (NaN without objects) plus per-class APs (NaN for classes without objects)."""
    precision = coco_precision(detections, ground_truths, num_classes, max_dets)
    # The same expressions as COCOeval.summarize (and evaluate_coco), so the means agree bit for bit.
    ap50_95, ap50 = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    for c in range(num_classes):
        p = precision[:, :, c]
        if (p > -1).any():
            ap50_95[c], ap50[c] = p[p > -1].mean(), p[0][p[0] > -1].mean()
    map50, map50_95 = mean_ap(precision)
    return {"map50": map50, "map50_95": map50_95, "per_class_ap50": ap50, "per_class_ap50_95": ap50_95}


def resampled_maps(m: CocoMatches, weights: np.ndarray, chunk_elements: int = 4_000_000) -> np.ndarray:
    """[R, 2]: (map50, map50_95) of each resample (weights [R, N]: copies of each image), vectorised over resamples.

    Equal to mean_ap(precision_from_matches(m, w)) up to the order of the final means, but fast: COCOeval's
    precision envelope peaks at true positives and a recall point is first reached at one, so only the true
    positives of each threshold are visited; the detections before each are counted with one cumulative sum
    of the image weights per class. Recall points are found by an integer search (the first true positive
    whose weighted count k has k / positives >= the point in COCOeval's float arithmetic), so ties resolve
    as in COCOeval.
    """
    weights = np.asarray(weights, np.float64)
    num_r, num_t, num_k = len(weights), m.tps.shape[0], len(m.bounds) - 1
    positives = weights @ m.positives                                  # [R, K] objects per class in each resample
    ap_sum, classes = np.zeros((num_r, num_t)), (positives > 0).sum(1)
    points = RECALL_POINTS[None]
    for c in range(num_k):
        lo, hi = m.bounds[c], m.bounds[c + 1]
        tps, kept = m.tps[:, lo:hi], m.tps[:, lo:hi] | m.fps[:, lo:hi]
        step = max(1, chunk_elements // max(1, hi - lo))
        for start in range(0, num_r, step):
            w = weights[start:start + step][:, m.det_image[lo:hi]]     # [B, Dc] weight of each detection
            npos = positives[start:start + step, c]
            seen = np.cumsum(w, axis=1)                                # detections up to and including each
            safe = np.where(npos > 0, npos, 1.0)[:, None]
            k = np.ceil(points * safe)                                 # smallest k with k / npos >= the point
            k = np.where((k - 1) / safe >= points, k - 1, k)
            k = np.where(k / safe < points, k + 1, k)                  # [B, 101]
            for t in range(num_t):
                tp_at = np.flatnonzero(tps[t])
                if not len(tp_at):
                    continue                                           # AP 0 where the class has objects
                tp = np.cumsum(w[:, tp_at], axis=1)                    # [B, M] true positives so far
                total = seen[:, tp_at]
                ignored_at = np.flatnonzero(~kept[t])
                if len(ignored_at):                                    # detections matched to crowd objects
                    before = np.searchsorted(ignored_at, tp_at)
                    ignored = np.cumsum(w[:, ignored_at], axis=1)
                    total = total - np.where(before > 0, ignored[:, np.maximum(before - 1, 0)], 0.0)
                pr = tp / (total + np.spacing(1))                      # tp / (tp + fp + eps), as COCOeval
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                b, count = tp.shape
                span = float(tp[:, -1].max()) + 2.0                    # rows of integer-valued floats: exact
                rows = np.arange(b, dtype=np.float64)[:, None] * span
                idx = np.searchsorted((tp + rows).ravel(), (np.minimum(k, span - 1) + rows).ravel(), "left")
                idx = idx.reshape(b, -1) - np.arange(b)[:, None] * count
                value = np.take_along_axis(pr, np.minimum(idx, count - 1), axis=1)
                ap = np.where(idx < count, value, 0.0).mean(axis=1)
                ap_sum[start:start + step, t] += np.where(npos > 0, ap, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_t = ap_sum / classes[:, None]
    return np.stack([per_t[:, 0], per_t.mean(axis=1)], axis=1)

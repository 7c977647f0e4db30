"""Anchors fitted to box sizes: IoU k-means, then an evolutionary refinement of YOLOv5's autoanchor fitness.

Box sizes `wh` are [N,2] in input pixels (after the letterbox). The fitness and the best possible recall
(BPR) use YOLOv5's width/height ratio rule: a box can be matched to an anchor when neither side differs by
more than `thr` (the hyp file's anchor_t, 4.0) from the anchor's.
"""
from __future__ import annotations

import numpy as np

MIN_SIDE = 2.0          # boxes under this many pixels say nothing about anchor shapes (YOLOv5 drops them too)
MAX_FIT_BOXES = 5_000   # a seeded sample of the boxes: plenty for 9 anchors, and seconds on sets as large as COCO


def wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of boxes and anchors sharing a centre: [N,2] x [K,2] -> [N,K]."""
    inter = np.minimum(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def best_ratio(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Per box, the best over anchors of min(w/aw, aw/w, h/ah, ah/h): 1 is a perfect fit. [N]."""
    a, b = wh[:, None], anchors[None]                                     # N,1,2 and 1,K,2
    return (np.minimum(a, b) / np.maximum(a, b)).min(2).max(1)            # N,K,2 -> N


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> float:
    """Share of boxes some anchor can be matched to under the ratio rule."""
    return float((best_ratio(wh, anchors) > 1 / thr).mean()) if len(wh) else 1.0


def fitness(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0) -> float:
    """YOLOv5's anchor fitness: the mean best ratio of the boxes that can be matched (0 for the others)."""
    best = best_ratio(wh, anchors)
    return float((best * (best > 1 / thr)).mean())


def sort_by_area(anchors: np.ndarray) -> np.ndarray:
    """Anchors small to large (the order the level masks index)."""
    return anchors[np.argsort(anchors.prod(1), kind="stable")]


def kmeans_iou(wh: np.ndarray, k: int, seed: int = 0, restarts: int = 5, iters: int = 300) -> np.ndarray:
    """k anchors by k-means with 1 - IoU as the distance and the median as the centre (as the tutorials'
    kmeans_for_anchors.py); the best of `restarts` seeded starts by mean best IoU; sorted by area."""
    if len(wh) < k:
        raise ValueError(f"{len(wh)} boxes of at least {MIN_SIDE:g} px cannot place {k} anchors; annotate more "
                         f"boxes or keep the default anchors")
    rng = np.random.default_rng(seed)
    best, best_score = None, -1.0
    for _ in range(restarts):
        centres = wh[rng.choice(len(wh), k, replace=False)].astype(np.float64)
        assign = None
        for _ in range(iters):
            new = wh_iou(wh, centres).argmax(1)
            if assign is not None and (new == assign).all():
                break
            assign = new
            for j in range(k):
                if (assign == j).any():         # an empty cluster keeps its centre
                    centres[j] = np.median(wh[assign == j], axis=0)
        score = float(wh_iou(wh, centres).max(1).mean())
        if score > best_score:
            best, best_score = centres.copy(), score
    return sort_by_area(best)


def evolve(wh: np.ndarray, anchors: np.ndarray, thr: float = 4.0, generations: int = 1000, seed: int = 0,
           mutation_prob: float = 0.9, sigma: float = 0.1) -> np.ndarray:
    """Mutate the anchors (random per-anchor scale factors), keeping a mutation when the fitness improves."""
    rng = np.random.default_rng(seed)
    best, best_fit = anchors.astype(np.float64), fitness(wh, anchors, thr)
    for _ in range(generations):
        factor = np.ones_like(best)
        while (factor == 1).all():          # a mutation must change something
            factor = ((rng.random(best.shape) < mutation_prob) * rng.random() * rng.standard_normal(best.shape)
                      * sigma + 1).clip(0.3, 3.0)
        trial = (best * factor).clip(min=MIN_SIDE)
        trial_fit = fitness(wh, trial, thr)
        if trial_fit > best_fit:
            best, best_fit = trial, trial_fit
    return sort_by_area(best)


def used_anchor_indices(anchors_mask: list[list[int]]) -> list[int]:
    """The anchor indices some level uses, ascending: YOLOv4-tiny's masks [[3,4,5],[1,2,3]] -> [1,2,3,4,5]."""
    return sorted({i for level in anchors_mask for i in level})


def place_in_used(anchors: np.ndarray, used: list[int], fitted: np.ndarray) -> np.ndarray:
    """All slots of `anchors`, the slots `used` holding `fitted` (len(used) anchors) small to large.

    The masks index anchors in area order, so the fitted ones fill the used slots in that order. An unused slot
    (YOLOv4-tiny's anchor 0) takes no box, so its value never matters: it copies the nearest used slot, which
    keeps the whole list small to large, as anchor files are.
    """
    full = np.asarray(anchors, np.float64).copy()
    full[used] = sort_by_area(np.asarray(fitted, np.float64))
    for i in sorted(set(range(len(full))) - set(used)):
        full[i] = full[min(used, key=lambda u: abs(u - i))]
    return full


def fit_anchors(wh: np.ndarray, k: int, thr: float = 4.0, seed: int = 0, generations: int = 1000) -> np.ndarray:
    """k anchors [k,2] for the box sizes: IoU k-means, then evolution; deterministic for a seed; small to large."""
    wh = np.asarray(wh, np.float64).reshape(-1, 2)
    wh = wh[(wh >= MIN_SIDE).all(1)]
    if len(wh) > MAX_FIT_BOXES:
        wh = wh[np.sort(np.random.default_rng(seed).choice(len(wh), MAX_FIT_BOXES, replace=False))]
    return evolve(wh, kmeans_iou(wh, k, seed), thr, generations, seed)

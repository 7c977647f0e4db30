"""Why ultralytics' val.py scores the same weights ~0.01 higher than our (pycocotools-equal) evaluator.

Takes the detections and ground truth that get_map.py writes (COCO json) and scores them with the two rules
that differ, one at a time, so the gap can be split between matching, interpolation and the per-image cap:

  matching      coco: detections in score order each take the unmatched object of highest IoU (pycocotools);
                ultralytics (v7.0 val.py, as we read it): every detection keeps its highest-IoU object of its
                class at or over the threshold, then each object keeps the first detection (in the image's
                score order) that chose it; the others are false positives
  interpolation coco: the monotone precision read at 101 recall points, 0 past the last recall reached;
                ultralytics: the precision envelope closed with (recall 1, precision 0), linearly interpolated
                at 101 points and integrated by the trapezoid rule (a sliver of area past the last recall)
  cap           detections kept: the best 100 per image and class (COCO's maxDets) or the best 300 per image
                (ultralytics' max_det)

The first row (coco, coco, 100) must equal get_map.py's summary; the last (ultralytics, ultralytics, 300) is the
peer's rule on our inference, so what remains between it and the peer's val.py on the same weights is the input
(its rectangular batches) and nothing of the metric. Difficult objects (crowd) are left out of both counts, as
neither set we benchmark has any (the script says so when it finds some).

usage: python3 bench/evaluator_parts.py MAP_OUT_DIR [MAP_OUT_DIR ...]   (get_map.py's --out folders)
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def xyxy(boxes: list) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def iou_matrix(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """[detections, objects] IoU of xyxy boxes."""
    lt = np.maximum(d[:, None, :2], g[None, :, :2])
    rb = np.minimum(d[:, None, 2:], g[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_d = (d[:, 2:] - d[:, :2]).prod(-1)
    area_g = (g[:, 2:] - g[:, :2]).prod(-1)
    return inter / np.maximum(area_d[:, None] + area_g[None, :] - inter, 1e-12)


def match_coco(iou: np.ndarray, threshold: float) -> np.ndarray:
    """True positives of one image and class (detections in score order): greedy by score, best free IoU."""
    taken = np.zeros(iou.shape[1], bool)
    tp = np.zeros(iou.shape[0], bool)
    for i in range(iou.shape[0]):
        candidates = np.where(~taken & (iou[i] >= threshold), iou[i], -1.0)
        if candidates.size and candidates.max() >= 0:
            j = int(np.argmax(candidates))
            taken[j], tp[i] = True, True
    return tp


def match_ultralytics(iou: np.ndarray, threshold: float) -> np.ndarray:
    """True positives of one image and class: each detection's best object, then each object's first detection."""
    tp = np.zeros(iou.shape[0], bool)
    if iou.size == 0:
        return tp
    best = np.argmax(iou, axis=1)
    chosen = iou[np.arange(len(best)), best] >= threshold
    claimed = set()
    for i in np.flatnonzero(chosen):        # score order: the first detection to choose an object keeps it
        if best[i] not in claimed:
            claimed.add(best[i])
            tp[i] = True
    return tp


def ap_coco(recall: np.ndarray, precision: np.ndarray) -> float:
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    padded = np.append(envelope, 0.0)
    return float(padded[np.minimum(index, len(envelope))].mean())


def ap_ultralytics(recall: np.ndarray, precision: np.ndarray) -> float:
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    y = np.interp(RECALL_POINTS, r, p)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(RECALL_POINTS)))


def score(gt: dict, dets: list, matching: str, interpolation: str, cap: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) under one choice of each rule; classes without objects stay out of the mean."""
    objects = defaultdict(list)                    # (image, class) -> boxes
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            objects[(a["image_id"], a["category_id"])].append(a["bbox"])
    limit, per_class = CAPS[cap]
    groups = defaultdict(list)
    for d in dets:
        groups[(d["image_id"], d["category_id"]) if per_class else d["image_id"]].append(d)
    kept = []
    for group in groups.values():
        kept += sorted(group, key=lambda d: -d["score"])[:limit]
    by_key = defaultdict(list)
    for d in kept:
        by_key[(d["image_id"], d["category_id"])].append(d)
    match = match_coco if matching == "coco" else match_ultralytics
    ap_of = ap_coco if interpolation == "coco" else ap_ultralytics
    classes = sorted({c for _, c in objects})
    aps = np.zeros((len(classes), len(THRESHOLDS)))
    for k, c in enumerate(classes):
        n_objects = sum(len(v) for (_, cc), v in objects.items() if cc == c)
        scores, hits = [], []
        for (image, cc), group in by_key.items():
            if cc != c:
                continue
            group = sorted(group, key=lambda d: -d["score"])
            g = xyxy(objects.get((image, c), []))
            iou = iou_matrix(xyxy([d["bbox"] for d in group]), g) if len(g) else np.zeros((len(group), 0))
            scores += [d["score"] for d in group]
            hits.append(np.stack([match(iou, t) for t in THRESHOLDS], axis=1))
        if not scores:
            continue
        order = np.argsort(-np.asarray(scores), kind="stable")
        tp = np.concatenate(hits)[order].astype(np.float64)
        tpc, fpc = np.cumsum(tp, 0), np.cumsum(1 - tp, 0)
        for t in range(len(THRESHOLDS)):
            aps[k, t] = ap_of(tpc[:, t] / n_objects, tpc[:, t] / (tpc[:, t] + fpc[:, t]))
    return float(aps[:, 0].mean()), float(aps.mean())


CAPS = {"100 per image and class": (100, True), "300 per image": (300, False)}
COCO_CAP, ULTRALYTICS_CAP = CAPS
RULES = [("coco", "coco", COCO_CAP), ("coco", "coco", ULTRALYTICS_CAP), ("coco", "ultralytics", COCO_CAP),
         ("ultralytics", "coco", COCO_CAP), ("ultralytics", "ultralytics", ULTRALYTICS_CAP)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="get_map.py --out folders")
    args = parser.parse_args()
    rows = defaultdict(list)
    for folder in args.folders:
        gt = json.loads((folder / "ground_truth.json").read_text())
        dets = json.loads((folder / "detections.json").read_text())
        if any(a.get("iscrowd", 0) for a in gt["annotations"]):
            print(f"note: {folder} has difficult (crowd) objects; they are left out, not ignored as COCO does")
        if (folder / "summary.json").is_file():
            summary = json.loads((folder / "summary.json").read_text())
            print(f"{folder}: get_map.py summary {summary['map50']:.4f} / {summary['map50_95']:.4f}")
        for rule in RULES:
            rows[rule].append(score(gt, dets, *rule))
    print("| matching | interpolation | detections kept | mAP50 | mAP50-95 |")
    print("|---|---|---|---|---|")
    base = [statistics.mean(v[i] for v in rows[RULES[0]]) for i in (0, 1)]
    for rule, values in rows.items():
        means = [statistics.mean(v[i] for v in values) for i in (0, 1)]
        print(f"| {rule[0]} | {rule[1]} | {rule[2]} | {means[0]:.4f} ({means[0] - base[0]:+.4f}) | "
              f"{means[1]:.4f} ({means[1] - base[1]:+.4f}) |")


if __name__ == "__main__":
    main()

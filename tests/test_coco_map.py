"""utils.ops.coco_map: hand-worked COCO cases (AP in comments) and agreement with pycocotools."""

import contextlib
import io
import math
import time

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.ops.coco_map import IOU_THRESHOLDS, coco_map, coco_precision
from utils.engine.evaluate import quick_metrics
from utils.ops.metrics import GroundTruth, coco_detections, coco_ground_truth, evaluate, evaluate_coco, evaluate_voc

A, B = [10, 10, 50, 50], [100, 100, 160, 150]
ELSEWHERE = [300, 300, 340, 340]  # overlaps nothing
BIG = [200, 0, 400, 200]  # a large region, used as a difficult (crowd) object


def gt(boxes, labels, difficult=None, image_id="img"):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return GroundTruth(boxes, np.asarray(labels, np.int64), difficult, 400, 500, image_id)


def dets(*rows):
    """Rows of (box, score, class) -> [N,6]."""
    return np.array([[*box, score, cls] for box, score, cls in rows], np.float64).reshape(-1, 6)


def close(value):
    """COCOeval's precision is tp / (tp + fp + eps): a perfect score is 1 - 2e-16, not 1."""
    return pytest.approx(value, abs=1e-12)


def reference(detections, truths, num_classes):
    """pycocotools through the project's wrapper (iscrowd = difficult)."""
    names = [f"c{k}" for k in range(num_classes)]
    return evaluate_coco(coco_ground_truth(truths, names), coco_detections(detections))


def both(detections, truths, num_classes=1):
    ours, ref = coco_map(detections, truths, num_classes), reference(detections, truths, num_classes)
    for key in ("map50", "map50_95"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12, nan_ok=True)
    return ours


def test_perfect_detection():
    r = both([dets((A, 0.9, 0))], [gt([A], [0])])
    assert r["map50"] == close(1) and r["map50_95"] == close(1)


def test_iou_06_counts_at_thresholds_up_to_06():
    # IoU([0,0,10,10], [0,0,6,10]) = 60/100 = 0.6 exactly; COCOeval matches iou >= t, so t = .5, .55, .6
    # -> AP 1 at 3 of the 10 thresholds, 0 at the others: map50_95 = 0.3 (0.2 needs IoU in [.55, .6)).
    g = [gt([[0, 0, 10, 10]], [0])]
    r = both([dets(([0, 0, 6, 10], 0.9, 0))], g)
    assert r["map50"] == close(1) and r["map50_95"] == close(0.3)
    r = both([dets(([0, 0, 5.8, 10], 0.9, 0))], g)  # IoU .58: t = .5, .55 only
    assert r["map50"] == close(1) and r["map50_95"] == close(0.2)


def test_tp_fp_tp_is_101_point_interpolation():
    # 2 objects; TP(.9), FP(.8), TP(.7): precision 1 at recall points 0..0.5 (51), 2/3 at 0.51..1 (50)
    r = both([dets((A, 0.9, 0), (ELSEWHERE, 0.8, 0), (B, 0.7, 0))], [gt([A, B], [0, 0])])
    assert r["map50"] == close((51 + 50 * 2 / 3) / 101)
    assert r["map50_95"] == close(r["map50"])


def test_second_detection_takes_the_next_free_object():
    # X, Y overlap; det1 = X takes X; det2 has IoU .905 with X (taken) and 85/115 = .739 with Y.
    # COCO: det2 takes Y at t <= .7 (AP 1), is an FP at t >= .75 (recall .5 at precision 1: 51/101).
    # VOC keeps det2 on its best object X, already taken: FP, AP .5.
    x, y = [0, 0, 10, 10], [2, 0, 12, 10]
    g, d = [gt([x, y], [0, 0])], [dets((x, 0.9, 0), ([0.5, 0, 10.5, 10], 0.8, 0))]
    r = both(d, g)
    assert r["map50"] == close(1) and r["map50_95"] == close((5 + 5 * 51 / 101) / 10)
    assert evaluate_voc(d, g, 1)[0] == close(0.5)


def test_detections_on_difficult_objects_are_ignored_with_crowd_iou():
    # BIG is difficult (iscrowd): IoU with it is intersection / detection area, so small boxes inside it
    # (IoU 1 by that rule, .01 by union) are matched to it as often as they come: neither TP nor FP.
    g = [gt([A, BIG], [0, 0], difficult=[False, True])]
    inside = [[210, 10, 230, 30], [250, 50, 270, 70]]
    d = [dets((inside[0], 0.95, 0), (A, 0.9, 0), (inside[1], 0.85, 0))]
    r = both(d, g)
    assert r["map50"] == close(1) and r["map50_95"] == close(1)
    # A regular object wins over a crowd one: this box fits A exactly and lies in BIG too.
    assert both([dets((A, 0.9, 0))], [gt([A, [0, 0, 400, 400]], [0, 0], difficult=[False, True])])["map50"] == close(1)


def test_only_best_100_per_image_and_class():
    # 100 false positives of class 0 above the only true positive: it is cut, AP 0.
    fps = [(ELSEWHERE, 0.9, 0)] * 100
    g = [gt([A], [0])]
    assert both([dets(*fps, (A, 0.5, 0))], g)["map50"] == 0.0
    # 99 are not enough to cut it: TP at rank 100 -> precision .01 at recall 1, AP = .01
    assert both([dets(*fps[:99], (A, 0.5, 0))], g)["map50"] == close(0.01)
    # The cap is per class: 100 boxes of class 1 leave class 0 alone.
    fps1 = [(ELSEWHERE, 0.9, 1)] * 100
    r = both([dets(*fps1, (A, 0.5, 0))], g, num_classes=2)
    assert r["map50"] == close(1) and math.isnan(r["per_class_ap50"][1])


def test_equal_scores_keep_input_then_image_order():
    # Same score: the detection listed first (or on the earlier image) comes first, as in COCOeval.
    g = [gt([A], [0])]
    # FP then TP: precision .5 at recall 1, the envelope carries it to every recall point -> .5
    assert both([dets((ELSEWHERE, 0.9, 0), (A, 0.9, 0))], g)["map50"] == close(0.5)
    assert both([dets((A, 0.9, 0), (ELSEWHERE, 0.9, 0))], g)["map50"] == close(1)
    g2 = [gt([], [], image_id="a"), gt([A], [0], image_id="b")]
    assert both([dets((A, 0.9, 0)), dets((A, 0.9, 0))], g2)["map50"] == close(0.5)


def test_classes_without_objects_and_no_detections():
    # class 1 has only a difficult object, class 2 nothing: both NaN and out of the mean.
    g = [gt([A, B], [0, 1], difficult=[False, True])]
    r = both([dets((A, 0.9, 0), (ELSEWHERE, 0.8, 2))], g, num_classes=3)
    assert r["map50"] == close(1) and np.isnan(r["per_class_ap50_95"][1:]).all()
    r = both([np.zeros((0, 6))], g, num_classes=3)
    assert r["map50"] == 0.0 and r["map50_95"] == 0.0
    r = coco_map([dets((A, 0.9, 0))], [gt([], [])], 2)  # no objects at all: no mAP (COCOeval: -1)
    assert math.isnan(r["map50"]) and math.isnan(r["map50_95"])


def random_case(seed, num_images=24, num_classes=5, crowded=(0, 7)):
    """Jittered copies of random objects (several per object), random false positives with tied scores,
    difficult objects, images without objects or detections, a class without objects, and images
    `crowded` with more than 100 detections of one class."""
    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for i in range(num_images):
        n = 0 if i % 6 == 5 else int(rng.integers(1, 12))
        xy = rng.uniform(0, 400, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 160, (n, 2))], 1)
        labels = rng.integers(0, num_classes - 1, n)  # the last class never has objects
        truths.append(gt(boxes, labels, difficult=rng.random(n) < 0.2, image_id=str(i)))
        size = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        rows = []
        for _ in range(3):
            found = rng.random(n) < 0.7
            rows.append(np.c_[boxes + rng.normal(0, 0.12, (n, 4)) * size, rng.uniform(0, 1, n), labels][found])
        k = int(rng.integers(120, 180)) if i in crowded else int(rng.integers(0, 8))
        fxy = rng.uniform(0, 400, (k, 2))
        cls = np.zeros(k) if i in crowded else rng.integers(0, num_classes, k)
        rows.append(np.c_[fxy, fxy + rng.uniform(5, 150, (k, 2)), np.round(rng.uniform(0, 1, k), 1), cls])
        d = np.concatenate(rows)
        detections.append(d[:0] if i % 6 == 2 else d.astype(np.float32))
    return detections, truths, num_classes


def pycocotools_precision(detections, truths, num_classes):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = coco_ground_truth(truths, [f"c{k}" for k in range(num_classes)])
        coco_gt.createIndex()
        e = COCOeval(coco_gt, coco_gt.loadRes(coco_detections(detections)), "bbox")
        e.evaluate()
        e.accumulate()
    return e.eval["precision"][:, :, :, 0, -1]  # area "all", maxDets 100


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_pycocotools(seed):
    detections, truths, nc = random_case(seed)
    assert max(np.sum(d[:, 5] == 0) for d in detections) > 100
    ours, ref = coco_map(detections, truths, nc), reference(detections, truths, nc)
    assert abs(ours["map50"] - ref["map50"]) < 1e-6 and abs(ours["map50_95"] - ref["map50_95"]) < 1e-6
    np.testing.assert_allclose(ours["per_class_ap50"], ref["per_class_ap50"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(ours["per_class_ap50_95"], ref["per_class_ap50_95"], atol=1e-6, rtol=0)
    assert math.isnan(ours["per_class_ap50"][nc - 1])
    assert 0.05 < ours["map50_95"] < ours["map50"] < 0.95  # non-trivial
    np.testing.assert_allclose(coco_precision(detections, truths, nc), pycocotools_precision(detections, truths, nc),
                               atol=1e-12, rtol=0)


def test_epoch_metrics_equal_get_map_summary():
    # Evaluator.quick (every epoch) and Evaluator.full (get_map.py) give the same numbers under the same names.
    detections, truths, nc = random_case(5)
    quick = quick_metrics(detections, truths, nc)
    summary, _, _ = evaluate(detections, truths, [f"c{k}" for k in range(nc)])
    assert set(quick) == {"map50", "map50_95", "map50_voc"}
    for key in quick:
        assert quick[key] == pytest.approx(summary[key], abs=1e-12)


def test_fast_enough_for_every_epoch():
    # 100 images x 300 detections, 20 classes; measured ~0.15 s on one core, the bound leaves room.
    rng = np.random.default_rng(0)
    truths, detections = [], []
    for i in range(100):
        n = int(rng.integers(1, 30))
        xy = rng.uniform(0, 500, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 150, (n, 2))], 1)
        labels = rng.integers(0, 20, n)
        truths.append(gt(boxes, labels, difficult=rng.random(n) < 0.1, image_id=str(i)))
        pick = rng.integers(0, n, 300)
        jitter = rng.normal(0, 0.2, (300, 4)) * np.tile(boxes[pick, 2:] - boxes[pick, :2], 2)
        cls = np.where(rng.random(300) < 0.8, labels[pick], rng.integers(0, 20, 300))
        detections.append(np.c_[boxes[pick] + jitter, rng.uniform(0, 1, 300), cls].astype(np.float32))
    start = time.perf_counter()
    r = coco_map(detections, truths, 20)
    assert time.perf_counter() - start < 1.5
    assert 0 < r["map50_95"] < r["map50"] < 1
    assert len(IOU_THRESHOLDS) == 10

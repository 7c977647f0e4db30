"""Metrics on hand-built cases (AP worked out in comments) and agreement with pycocotools."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.ops.metrics import (
    GroundTruth,
    coco_detections,
    coco_ground_truth,
    evaluate,
    evaluate_coco,
    evaluate_voc,
    format_table,
    precision_recall_f1,
    voc_ap,
)

# Four well separated objects to place detections on.
A, B, C, D = [10, 10, 50, 50], [100, 100, 160, 150], [200, 20, 260, 90], [20, 200, 90, 260]
ELSEWHERE = [300, 300, 340, 340]  # overlaps nothing


def gt(boxes, labels, difficult=None, image_id="img", size=(400, 500)):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return GroundTruth(boxes, np.asarray(labels, np.int64), difficult, size[0], size[1], image_id)


def dets(*rows):
    """Rows of (box, score, class) -> [N,6]."""
    return np.array([[*box, score, cls] for box, score, cls in rows], np.float64).reshape(-1, 6)


def test_voc_ap_step_curve():
    # recall .5,.5,1 / precision 1,.5,2/3: envelope 1 up to recall .5, then 2/3 -> .5*1 + .5*2/3
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(5 / 6)
    assert voc_ap(np.array([]), np.array([])) == 0.0
    # precision rises later: the envelope lifts the first step to .8 -> .25*.8 + .75*.8
    assert voc_ap(np.array([0.25, 1.0]), np.array([0.5, 0.8])) == pytest.approx(0.8)


def test_tp_fp_tp_gives_hand_computed_ap():
    # 2 objects; TP(.9), FP(.8), TP(.7) -> AP = .5*1 + .5*(2/3) = 5/6
    g = [gt([A, B], [0, 0])]
    d = [dets((A, 0.9, 0), (ELSEWHERE, 0.8, 0), (B, 0.7, 0))]
    assert evaluate_voc(d, g, 1)[0] == pytest.approx(5 / 6)


def test_order_is_by_score_over_the_whole_set():
    # Same detections as above spread over two images and listed out of order: still 5/6.
    g = [gt([A], [0], image_id="a"), gt([B], [0], image_id="b")]
    d = [dets((A, 0.9, 0)), dets((B, 0.7, 0), (ELSEWHERE, 0.8, 0))]
    assert evaluate_voc(d, g, 1)[0] == pytest.approx(5 / 6)


def test_duplicate_detection_is_false_positive():
    # 2 objects; TP(.9) on A, duplicate of A (.8) = FP, TP(.7) on B -> 5/6 as above
    g = [gt([A, B], [0, 0])]
    shifted = [12, 10, 52, 50]  # IoU with A ~ .9: matches A, which is already taken
    d = [dets((A, 0.9, 0), (shifted, 0.8, 0), (B, 0.7, 0))]
    assert evaluate_voc(d, g, 1)[0] == pytest.approx(5 / 6)
    p, r, _ = precision_recall_f1(d, g, 1, score_threshold=0.0)
    assert p[0] == pytest.approx(2 / 3) and r[0] == pytest.approx(1.0)


def test_low_iou_is_false_positive():
    # IoU(A, half of A) = .5 counts (>= threshold); a box a bit smaller does not.
    g = [gt([A], [0])]
    assert evaluate_voc([dets(([10, 10, 30, 50], 0.9, 0))], g, 1)[0] == pytest.approx(1.0)
    assert evaluate_voc([dets(([10, 10, 29, 50], 0.9, 0))], g, 1)[0] == pytest.approx(0.0)


def test_wrong_class_is_false_positive_and_class_without_gt_is_nan():
    # class 0: A in image 0, found at .9 -> AP 1
    # class 1: C in image 1, found at .5; a class-1 box on A (.95) is an FP -> FP, TP: AP = 1 * .5 = .5
    # class 2: no objects -> NaN, even with a detection of it
    g = [gt([A], [0], image_id="a"), gt([C], [1], image_id="b")]
    d = [dets((A, 0.95, 1), (A, 0.9, 0), (B, 0.3, 2)), dets((C, 0.5, 1))]
    ap = evaluate_voc(d, g, 3)
    assert ap[:2] == pytest.approx([1.0, 0.5]) and math.isnan(ap[2])
    summary, _, _ = evaluate(d, g, ["a", "b", "c"])
    assert summary["map50_voc"] == pytest.approx(0.75)  # mean over classes 0 and 1 only
    assert summary["per_class"]["c"] == {k: None for k in ("ap50_voc", "ap50", "ap50_95", "precision",
                                                           "recall", "f1")} | {"num_gt": 0}
    assert summary["map50"] == pytest.approx(0.75) and summary["map50_95"] == pytest.approx(0.75)


def test_difficult_objects_are_ignored():
    # A, B normal, C difficult. TP(.9) on A, .8 on C (ignored), FP(.7), TP(.6) on B
    # -> TP, FP, TP over 2 positives = 5/6. (Counted as FP it would be .75; C as a positive, less.)
    g = [gt([A, B, C], [0, 0, 0], difficult=[False, False, True])]
    d = dets((A, 0.9, 0), (C, 0.8, 0), (ELSEWHERE, 0.7, 0), (B, 0.6, 0))
    ap = evaluate_voc([d], g, 1)[0]
    assert ap == pytest.approx(5 / 6)
    assert evaluate_voc([np.delete(d, 1, axis=0)], g, 1)[0] == pytest.approx(ap)
    p, r, _ = precision_recall_f1([d], g, 1, score_threshold=0.0)
    assert p[0] == pytest.approx(2 / 3) and r[0] == pytest.approx(1.0)
    summary, coco_gt, _ = evaluate([d], g, ["x"])
    assert summary["per_class"]["x"]["num_gt"] == 2
    assert [a["iscrowd"] for a in coco_gt["annotations"]] == [0, 0, 1]
    # COCO: the detection on the crowd (difficult) object is ignored too; 101-point AP of TP,FP,TP
    assert summary["map50"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)


def test_only_difficult_objects_give_nan():
    g = [gt([A], [0], difficult=[True])]
    assert math.isnan(evaluate_voc([dets((A, 0.9, 0))], g, 1)[0])


def test_precision_recall_f1_at_threshold():
    # class 0, 3 objects: TP .9, TP .8, FP .6, TP .4 (below .5) -> P = 2/3, R = 2/3, F1 = 2/3
    # class 1, 4 objects: TP .7, FP .3 (below)                 -> P = 1, R = 1/4, F1 = 2*.25/1.25 = .4
    # class 2: no objects -> NaN
    g = [gt([A, B, C], [0, 0, 0], image_id="a"), gt([A, B, C, D], [1, 1, 1, 1], image_id="b")]
    d = [dets((A, 0.9, 0), (B, 0.8, 0), (ELSEWHERE, 0.6, 0), (C, 0.4, 0)),
         dets((A, 0.7, 1), (ELSEWHERE, 0.3, 1))]
    p, r, f1 = precision_recall_f1(d, g, 3, score_threshold=0.5)
    np.testing.assert_allclose(p[:2], [2 / 3, 1.0])
    np.testing.assert_allclose(r[:2], [2 / 3, 0.25])
    np.testing.assert_allclose(f1[:2], [2 / 3, 0.4])
    assert np.isnan([p[2], r[2], f1[2]]).all()
    summary, _, _ = evaluate(d, g, ["a", "b", "c"], score_threshold=0.5)
    assert summary["precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert summary["f1"] == pytest.approx((2 / 3 + 0.4) / 2)
    # No detection above the threshold: P = R = F1 = 0.
    p, r, f1 = precision_recall_f1(d, g, 3, score_threshold=0.95)
    np.testing.assert_allclose([p[0], r[0], f1[0]], [0, 0, 0])


def random_case(seed=0, num_images=40, num_classes=4, width=640, height=480):
    """Random objects; detections = jittered objects with random scores + random false positives."""
    rng = np.random.default_rng(seed)
    gts, detections = [], []
    for i in range(num_images):
        n = rng.integers(0, 7)
        xy = rng.uniform([0, 0], [width - 200, height - 200], (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(30, 200, (n, 2))], 1)
        labels = rng.integers(0, num_classes, n)
        gts.append(gt(boxes, labels, image_id=f"{i:06d}", size=(height, width)))
        found = rng.random(n) < 0.85
        size = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        jittered = boxes + rng.normal(0, 0.08, (n, 4)) * size
        rows = [np.c_[jittered, rng.uniform(0.05, 1.0, n), labels][found]]
        k = rng.poisson(1.5)
        fp_xy = rng.uniform([0, 0], [width - 100, height - 100], (k, 2))
        fp_boxes = np.concatenate([fp_xy, fp_xy + rng.uniform(20, 100, (k, 2))], 1)
        rows.append(np.c_[fp_boxes, rng.uniform(0.0, 0.7, k), rng.integers(0, num_classes, k)])
        detections.append(np.concatenate(rows).astype(np.float32))
    return detections, gts, [f"class{k}" for k in range(num_classes)]


def pycocotools_direct(gt_dict, det_list):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt_dict))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(json.loads(json.dumps(det_list)))
        e = COCOeval(coco_gt, coco_dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def test_agrees_with_pycocotools():
    detections, gts, names = random_case()
    summary, coco_gt, coco_dets = evaluate(detections, gts, names)
    e = pycocotools_direct(coco_gt, coco_dets)
    ours = evaluate_coco(coco_gt, coco_dets)
    assert ours["map50_95"] == e.stats[0] and ours["map50"] == e.stats[1]
    for k in range(len(names)):
        p = e.eval["precision"][:, :, k, 0, 2]
        assert ours["per_class_ap50_95"][k] == p[p > -1].mean()
        assert ours["per_class_ap50"][k] == p[0][p[0] > -1].mean()
    assert 0.3 < summary["map50_95"] < summary["map50"] < 0.95  # a realistic, non-trivial case
    # VOC all-point vs COCO 101-point interpolation of the same matches: close, per class and overall.
    voc = evaluate_voc(detections, gts, len(names))
    np.testing.assert_allclose(voc, ours["per_class_ap50"], atol=0.02)
    assert summary["map50_voc"] == pytest.approx(summary["map50"], abs=0.02)


def test_ground_truth_as_detections_is_perfect():
    _, gts, names = random_case(seed=1)
    gts[3].difficult[:] = True  # detections on difficult objects are ignored, so still perfect
    detections = [np.c_[g.boxes, np.ones(len(g.boxes)), g.labels] for g in gts]
    summary, _, _ = evaluate(detections, gts, names)
    assert summary["map50_voc"] == 1.0 and summary["map50"] == 1.0 and summary["map50_95"] == 1.0
    assert summary["precision"] == 1.0 and summary["recall"] == 1.0 and summary["f1"] == 1.0


def test_empty_detections_and_images_without_objects():
    g = [gt([A, B], [0, 1], image_id="a"), gt([], [], image_id="empty")]
    empty = [np.zeros((0, 6)), np.zeros((0, 6))]
    summary, coco_gt, coco_dets = evaluate(empty, g, ["x", "y"])
    assert coco_dets == []
    assert summary["map50_voc"] == 0.0 and summary["map50"] == 0.0 and summary["map50_95"] == 0.0
    assert summary["recall"] == 0.0 and summary["per_class"]["y"]["ap50"] == 0.0
    assert [im["file_name"] for im in coco_gt["images"]] == ["a", "empty"]
    assert [im["id"] for im in coco_gt["images"]] == [1, 2]
    # A false positive on the image without objects costs precision.
    d = [dets((A, 0.9, 0), (B, 0.8, 1)), dets((A, 0.95, 0))]
    summary, _, _ = evaluate(d, g, ["x", "y"])
    assert summary["per_class"]["x"]["ap50_voc"] == pytest.approx(0.5)
    assert summary["per_class"]["x"]["precision"] == pytest.approx(0.5)


def test_coco_formats_and_json():
    g = [gt([[10, 20, 50, 80]], [2], image_id="000005", size=(375, 500))]
    d = [dets(([12, 20, 50, 80], 0.75, 2))]
    coco_gt = coco_ground_truth(g, ["a", "b", "c"])
    assert coco_gt["images"] == [{"id": 1, "file_name": "000005", "height": 375, "width": 500}]
    assert coco_gt["annotations"] == [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 60.0],
                                       "area": 2400.0, "iscrowd": 0}]
    assert [c["id"] for c in coco_gt["categories"]] == [1, 2, 3]
    assert coco_detections(d) == [{"image_id": 1, "category_id": 3, "bbox": [12.0, 20.0, 38.0, 60.0], "score": 0.75}]
    summary, coco_gt2, coco_dets = evaluate(d, g, ["a", "b", "c"])
    # evaluation must not add pycocotools' bookkeeping keys to what callers write to disk
    assert coco_gt2 == coco_gt and set(coco_dets[0]) == {"image_id", "category_id", "bbox", "score"}
    json.dumps(summary, allow_nan=False)  # NaN never reaches JSON
    table = format_table(summary, ["a", "b", "c"])
    lines = table.splitlines()
    assert lines[0].split() == ["Class", "GT", "AP50(VOC)", "AP50", "AP50-95", "P", "R", "F1"]
    assert lines[-1].split()[:3] == ["all", "1", "1.000"]
    assert lines[2].split() == ["a", "0", "-", "-", "-", "-", "-", "-"]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="images"):
        evaluate_voc([np.zeros((0, 6))], [], 1)
    with pytest.raises(ValueError, match="class"):
        evaluate_voc([dets((A, 0.9, 5))], [gt([A], [0])], 2)

"""The study's statistics on constructed detections with known answers, and the full-cost FLOP counter."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from nets.attention import build_attention
from utils.ops.coco_map import (coco_map, coco_matches, coco_precision, mean_ap, precision_from_matches,
                                resampled_maps)
from utils.ops.cost import count_flops, model_cost
from utils.ops.metrics import GroundTruth
from utils.study.stats import mean_sd, paired_deltas, resample_weights


def truth(box, label=0):
    return GroundTruth(np.array([box], np.float32), np.array([label], np.int64), np.zeros(1, bool), 100, 100, "i")


def random_set(rng, n_images, n_classes=3, noise=6.0, difficult=0.0):
    """Images with 1-3 objects (a share `difficult`: crowd regions for COCO) and noisy, partly wrong detections."""
    truths, dets = [], []
    for _ in range(n_images):
        k = rng.integers(1, 4)
        xy = rng.uniform(0, 60, (k, 2))
        boxes = np.c_[xy, xy + rng.uniform(10, 40, (k, 2))].astype(np.float32)
        labels = rng.integers(0, n_classes, k)
        truths.append(GroundTruth(boxes, labels, rng.random(k) < difficult, 100, 100, "i"))
        jitter = boxes + rng.normal(0, noise, boxes.shape)
        extra = np.c_[rng.uniform(0, 60, (2, 2)), rng.uniform(70, 99, (2, 2))]
        rows = np.r_[np.c_[jitter, rng.uniform(0.2, 1, k), labels], np.c_[extra, rng.uniform(0, 0.6, 2),
                                                                          rng.integers(0, n_classes, 2)]]
        dets.append(rows)
    return dets, truths


def test_a_resample_equals_cocoeval_on_the_duplicated_images():
    rng = np.random.default_rng(0)
    dets, truths = random_set(rng, 12, difficult=0.2)
    matches = coco_matches(dets, truths, 3)
    np.testing.assert_array_equal(precision_from_matches(matches), coco_precision(dets, truths, 3))
    for w in resample_weights(12, 5, seed=1):
        copies = [i for i in range(12) for _ in range(int(w[i]))]   # adjacent copies, images in order
        expected = coco_precision([dets[i] for i in copies], [truths[i] for i in copies], 3)
        np.testing.assert_allclose(precision_from_matches(matches, w), expected, atol=1e-12)
        np.testing.assert_allclose(resampled_maps(matches, w[None])[0], mean_ap(expected), atol=1e-12)


def test_vectorised_resamples_equal_one_at_a_time():
    dets, truths = random_set(np.random.default_rng(2), 40, noise=3.0, difficult=0.2)
    matches = coco_matches(dets, truths, 3)
    assert (~(matches.tps | matches.fps)).any()     # some detections are matched to crowd objects: ignored
    weights = resample_weights(40, 30, seed=4)
    weights[0] = 1                                   # the full set itself
    weights[1, :39] = 0                              # one image: classes without objects drop out
    expected = np.array([mean_ap(precision_from_matches(matches, w)) for w in weights])
    np.testing.assert_allclose(resampled_maps(matches, weights, chunk_elements=5000), expected, atol=1e-12)
    np.testing.assert_allclose(resampled_maps(matches, weights)[0], mean_ap(coco_precision(dets, truths, 3)),
                               atol=1e-12)


def test_identical_variants_have_delta_zero_within_noise():
    rng = np.random.default_rng(1)
    runs = {s: coco_matches(*random_set(np.random.default_rng(s), 20), 3) for s in (0, 1)}
    twin = {s: coco_matches(*random_set(np.random.default_rng(s), 20), 3) for s in (0, 1)}
    deltas = paired_deltas(runs, twin, resample_weights(20, 200, seed=int(rng.integers(100))))
    for d in deltas.values():
        assert d.value == 0 and d.low == 0 and d.high == 0 and d.within_noise


def test_a_variant_better_on_every_image_has_a_positive_interval():
    # every image: one object; the baseline's box has IoU 0.6 (AP counts at IoU .5-.6 only: 0.3 mAP50-95),
    # the variant's is exact (1.0), on every image -> delta 0.7 on every resample; mAP50 ties at 1.
    n = 15
    truths = [truth([0, 0, 10, 10]) for _ in range(n)]
    base = [np.array([[0, 0, 6, 10, 0.9, 0]]) for _ in range(n)]
    better = [np.array([[0, 0, 10, 10, 0.9, 0]]) for _ in range(n)]
    weights = resample_weights(n, 300)
    d = paired_deltas({0: coco_matches(base, truths, 1)}, {0: coco_matches(better, truths, 1)}, weights)
    assert d["map50_95"].value == pytest.approx(0.7, abs=1e-9)
    assert d["map50_95"].low == pytest.approx(0.7, abs=1e-9) and not d["map50_95"].within_noise
    assert d["map50"].value == pytest.approx(0, abs=1e-9) and d["map50"].within_noise


def test_a_small_gain_on_some_images_has_an_interval_that_moves_with_them():
    # the variant fixes a random third of the images (IoU .6 -> 1): the delta is positive, its interval
    # lies above 0 but is wide, and the point estimate sits inside it
    rng = np.random.default_rng(3)
    n = 30
    fixed = rng.random(n) < 1 / 3
    truths = [truth([0, 0, 10, 10]) for _ in range(n)]
    base = [np.array([[0, 0, 6, 10, 0.9, 0]]) for _ in range(n)]
    var = [np.array([[0, 0, 10 if f else 6, 10, 0.9, 0]]) for f in fixed]
    d = paired_deltas({0: coco_matches(base, truths, 1)}, {0: coco_matches(var, truths, 1)},
                      resample_weights(n, 500))["map50_95"]
    assert d.value == pytest.approx(coco_map(var, truths, 1)["map50_95"] - 0.3, abs=1e-9)
    assert 0 < d.low < d.value < d.high < 0.7


def test_deltas_average_over_common_seeds_only():
    n = 10
    truths = [truth([0, 0, 10, 10]) for _ in range(n)]
    iou06 = coco_matches([np.array([[0, 0, 6, 10, 0.9, 0]])] * n, truths, 1)      # mAP50-95 0.3
    exact = coco_matches([np.array([[0, 0, 10, 10, 0.9, 0]])] * n, truths, 1)     # 1.0
    d = paired_deltas({0: iou06, 1: iou06, 2: exact}, {0: exact, 1: iou06}, resample_weights(n, 50))
    assert d["map50_95"].value == pytest.approx(0.35, abs=1e-9)                    # (0.7 + 0) / 2; seed 2 unpaired
    assert paired_deltas({0: iou06}, {1: exact}, resample_weights(n, 5)) is None


def test_mean_and_sd_over_seeds_by_hand():
    mean, sd = mean_sd([0.544, 0.561, 0.570])
    assert mean == pytest.approx(0.558333333, abs=1e-8)
    # deviations -0.014333, 0.002667, 0.011667: squares sum 0.0003487 / 2 -> sd 0.013204
    assert sd == pytest.approx(math.sqrt((0.014333333**2 + 0.002666667**2 + 0.011666667**2) / 2), abs=1e-8)
    assert math.isnan(mean_sd([0.5])[1]) and all(math.isnan(v) for v in mean_sd([]))
    assert mean_sd([0.4, float("nan"), 0.6]) == (pytest.approx(0.5), pytest.approx(math.sqrt(0.02)))


def test_bootstrap_is_fast_with_precomputed_matches():
    dets, truths = random_set(np.random.default_rng(5), 100, noise=4.0)
    base = coco_matches(dets, truths, 3)
    other = coco_matches(*random_set(np.random.default_rng(5), 100, noise=5.0), 3)
    start = time.perf_counter()
    d = paired_deltas({0: base}, {0: other}, resample_weights(100, 200))
    assert time.perf_counter() - start < 5         # 400 COCO evaluations; ~0.1 s on one core
    full = mean_ap(precision_from_matches(other))[1] - mean_ap(precision_from_matches(base))[1]
    assert d["map50_95"].value == pytest.approx(full) and d["map50_95"].low <= full <= d["map50_95"].high


C, H, W = 256, 26, 26


def test_se_costs_what_its_paper_says_plus_pooling_and_gate():
    # Hu et al.: the two FC layers of an SE block add 2 C^2 / r multiply-adds (params 2 C^2 / r + biases);
    # beyond them it pools (H W C adds), applies ReLU (C/r) and sigmoid (C), and scales (H W C multiplies).
    block = build_attention("se", C)
    flops = count_flops(block, torch.zeros(1, C, H, W))
    r = 16
    assert flops.matmul == 2 * (2 * C * C // r)
    assert flops.total == 2 * (2 * C * C // r) + 2 * H * W * C + C // r + C


def test_ca_costs_what_its_structure_says():
    # Hou et al.: pool along W and along H (2 H W C), a shared 1x1 conv C -> mip on the H + W pooled columns,
    # BN + h_swish on them, two 1x1 convs mip -> C, sigmoids on (H + W) C, and x * a_h * a_w (2 H W C).
    block = build_attention("ca", C)
    mip = max(8, C // 32)
    flops = count_flops(block, torch.zeros(1, C, H, W))
    convs = 2 * (H + W) * C * mip + 2 * (H + W) * mip * C
    assert flops.matmul == convs
    bn, hswish = 2 * mip * (H + W), 4 * mip * (H + W)      # scale + shift; x + 3, relu6, *, / 6
    assert flops.total == convs + 2 * H * W * C + bn + hswish + (H + W) * C + 2 * H * W * C


def test_eca_is_mostly_pooling_and_gating():
    block = build_attention("eca", C)
    k = block.conv.kernel_size[0]
    flops = count_flops(block, torch.zeros(1, C, H, W))
    assert flops.matmul == 2 * C * k
    assert flops.total == 2 * C * k + 2 * H * W * C + C


def test_model_cost_reports_the_attention_share():
    from nets.yolo import build_model, make_config
    names = ["a", "b"]
    plain = model_cost(build_model(make_config("yolov4-tiny", 0, names, (416, 416))), 416)
    se = model_cost(build_model(make_config("yolov4-tiny", "se", names, (416, 416))), 416)
    assert plain["attention_gflops"] == 0
    assert se["gflops"] - plain["gflops"] == pytest.approx(se["attention_gflops"], rel=1e-9)
    # at 416 px the matmul-only count hides most of SE's cost (pooling and scaling are per pixel)
    assert se["gflops_matmul"] - plain["gflops_matmul"] < 0.25 * se["attention_gflops"]
    assert se["parameters"] > plain["parameters"]

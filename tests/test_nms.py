"""Non-maximum suppression against a plain greedy reference, per image and class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from import_probe import loaded_after
from utils.ops.boxes import blocked_nms, matrix_nms, non_max_suppression, resolved_nms_method


def random_pred(b: int, n: int, c: int, seed: int, spread: float, size: tuple[float, float]) -> torch.Tensor:
    """Raw predictions [b, n, 5 + c]: centres in [0, spread), sides in [size[0], size[0] + size[1]), random scores."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.empty(b, n, 5 + c)
    pred[..., :2] = torch.rand(b, n, 2, generator=g) * spread
    pred[..., 2:4] = torch.rand(b, n, 2, generator=g) * size[1] + size[0]
    pred[..., 4:] = torch.rand(b, n, 1 + c, generator=g)
    return pred


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def greedy(boxes, scores, classes, conf, iou_thres, max_det):
    """Highest score first; drop a box overlapping a kept box of its class by more than iou_thres."""
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= conf:
            break
        if all(classes[j] != classes[i] or iou(boxes[i], boxes[j]) <= iou_thres for j in kept):
            kept.append(i)
    return kept[:max_det]


@pytest.mark.parametrize("method", ["per_image", "matrix", "blocked"])
@pytest.mark.parametrize("multi_label", [False, True])
def test_nms_matches_greedy_reference(multi_label, method):
    """Every way of suppressing (torchvision per image; every image at once as a matrix; blocks of candidates)
    keeps exactly the boxes of a plain greedy loop, in score order."""
    b, n, c = 3, 300, 4
    pred = random_pred(b, n, c, seed=0, spread=100, size=(5, 30))     # clustered centres: many overlaps
    pred[1, :, 4] = 0.0                                                  # an image with no candidates
    out = non_max_suppression(pred, conf_thres=0.2, iou_thres=0.45, max_det=40, multi_label=multi_label,
                              method=method)
    assert len(out) == b and len(out[1]) == 0
    for image in (0, 2):
        p = pred[image].numpy()
        xyxy = np.concatenate([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
        scores = p[:, 5:] * p[:, 4:5]                                    # N,C
        if multi_label:
            boxes, flat = np.repeat(xyxy, c, 0), scores.reshape(-1)
            classes = np.tile(np.arange(c), n)
        else:
            boxes, flat, classes = xyxy, scores.max(1), scores.argmax(1)
        expected = greedy(boxes, flat, classes, 0.2, 0.45, 40)
        got = out[image].numpy()
        assert len(got) == len(expected)
        np.testing.assert_allclose(got[:, :4], boxes[expected], atol=1e-4)
        np.testing.assert_allclose(got[:, 4], flat[expected], atol=1e-6)
        np.testing.assert_array_equal(got[:, 5], classes[expected])


def test_matrix_nms_equals_per_image_on_dense_scenes_and_needs_several_passes():
    """Chains of overlapping boxes (A suppresses B, so B cannot suppress C) are where a one-pass matrix NMS
    would differ from greedy NMS; the iterated one gives torchvision's answer."""
    g = torch.Generator().manual_seed(1)
    b, n, c = 4, 400, 2
    pred = torch.empty(b, n, 5 + c)
    pred[..., 0] = torch.rand(b, n, generator=g) * 60                  # boxes in a row, each overlapping the next
    pred[..., 1] = 20 + torch.rand(b, n, generator=g) * 4
    pred[..., 2:4] = torch.rand(b, n, 2, generator=g) * 10 + 8
    pred[..., 4:] = torch.rand(b, n, 1 + c, generator=g)
    for multi_label in (False, True):
        per_image = non_max_suppression(pred, 0.05, 0.3, 300, multi_label, method="per_image")
        matrix = non_max_suppression(pred, 0.05, 0.3, 300, multi_label, method="matrix")
        for a, m in zip(per_image, matrix):
            assert len(a) > 3
            torch.testing.assert_close(a, m, rtol=0, atol=0)
    # a chain of three: 0 suppresses 1, so 2 (overlapping only 1) survives; one pass alone would drop 2
    det = torch.tensor([[[0, 0, 10, 10, 0.9, 0], [4, 0, 14, 10, 0.8, 0], [8, 0, 18, 10, 0.7, 0]]])
    assert matrix_nms(det, [3], 0.3).tolist() == [[True, False, True]]
    assert matrix_nms(det, [1], 0.3).tolist() == [[True, False, False]]      # beyond the count: never kept


def test_blocked_nms_equals_torchvision_across_blocks_and_stops_at_max_det():
    """Dense candidates spread over many small blocks: the boxes kept from earlier rounds suppress later ones."""
    b = 2
    pred = random_pred(b, 700, 3, seed=2, spread=80, size=(5, 25))
    for multi_label in (False, True):
        per_image = non_max_suppression(pred, 0.01, 0.5, 1000, multi_label, method="per_image")
        for image in range(b):
            # every candidate, sorted (IoU never exceeds 1, so nothing is suppressed)
            det = non_max_suppression(pred[image:image + 1], 0.01, 1.0, 10**6, multi_label, method="per_image")[0]
            for block in (1, 7, 64, 4096):
                kept = blocked_nms(det[None], [len(det)], 0.5, 1000, block=block)[0]
                torch.testing.assert_close(det[kept], per_image[image], rtol=0, atol=0)
            five = blocked_nms(det[None], [len(det)], 0.5, 5, block=7)[0]
            assert five.tolist() == blocked_nms(det[None], [len(det)], 0.5, 1000, block=7)[0][:5].tolist()


def test_blocked_nms_needs_no_torchvision():
    """On GPUs a large candidate set goes block by block: torchvision (and torch._dynamo behind it) stays unloaded."""
    loaded = loaded_after("import torch\n"
                          "from utils.ops.boxes import non_max_suppression\n"
                          "out = non_max_suppression(torch.rand(2, 500, 8), 0.01, 0.5, 300, True, method='blocked')\n"
                          "assert len(out) == 2\n", ["torchvision", "torch._dynamo"])
    assert loaded == {"torchvision": False, "torch._dynamo": False}


def test_auto_on_the_cpu_needs_no_torchvision_for_a_prediction():
    """A prediction's few candidates fit one round: predicting an image on the CPU does not import torchvision."""
    loaded = loaded_after("import torch\n"
                          "from utils.ops.boxes import non_max_suppression\n"
                          "pred = torch.rand(2, 2000, 8)\n"
                          "pred[..., 4] = torch.where(torch.rand(2, 2000) < 0.02, 0.9, 0.01)\n"
                          "out = non_max_suppression(pred, 0.25, 0.5, 300)\n"
                          "assert 10 < sum(len(o) for o in out) < 200\n", ["torchvision", "torch._dynamo"])
    assert loaded == {"torchvision": False, "torch._dynamo": False}


def test_fitting_groups_keep_each_overlap_matrix_under_the_limit(monkeypatch):
    import utils.ops.boxes as boxes
    monkeypatch.setattr(boxes, "MATRIX_NMS_MAX_ELEMENTS", 3 * 100 * 100)
    assert boxes._fitting_groups([100, 100, 100, 100, 50]) == [[0, 1, 2], [3, 4]]
    assert boxes._fitting_groups([10, 200, 10, 0]) == [[0], [1], [2, 3]]
    # with boxes kept before, each image also holds a [k, kept] matrix
    assert boxes._fitting_groups([100, 100, 100], [50, 0, 0]) == [[0, 1], [2]]


@pytest.mark.parametrize("max_det", [190, 10**6])
def test_blocked_rounds_over_grouped_images_equal_per_image(monkeypatch, max_det):
    """What "auto" runs on CUDA (here on the CPU): every image in rounds of a block, in groups under the size
    limit; an image leaves once it has max_det boxes. The per-image answer whatever the block and grouping."""
    import utils.ops.boxes as boxes
    n, c = 300, 2
    pred = random_pred(5, n, c, seed=3, spread=60, size=(5, 20))
    pred[:4, :, 4] *= 0.3                                   # four lighter images, then a dense one
    pred[4, :, 4:] = 0.5 + pred[4, :, 4:] / 2
    scores = pred[..., 5:] * pred[..., 4:5]
    counts = (scores > 0.05).flatten(1).sum(1).tolist()
    block = min(counts) - 5                                 # every image has candidates past its first block
    monkeypatch.setattr(boxes, "MATRIX_NMS_MAX_ELEMENTS", 2 * block ** 2)     # two images a group in round 1
    rounds = []
    keep = boxes._matrix_keep
    monkeypatch.setattr(boxes, "_matrix_keep", lambda det, valid, iou: rounds.append(len(det)) or keep(det, valid, iou))

    top, idx = scores.flatten(1).topk(n * c, dim=1)         # the candidates as non_max_suppression orders them
    xyxy = boxes.cxcywh_to_xyxy(pred[..., :4])
    det = torch.cat([xyxy.gather(1, (idx // c)[..., None].expand(-1, -1, 4)), top[..., None],
                     (idx % c)[..., None].to(top.dtype)], -1)
    got = blocked_nms(det, counts, 0.4, max_det, block=block)
    reference = non_max_suppression(pred, 0.05, 0.4, max_det, True, method="per_image")
    for image, kept in enumerate(got):
        assert len(reference[image]) > 5
        torch.testing.assert_close(det[image][kept], reference[image], rtol=0, atol=0)
    # round 1 groups the five images two by two; later rounds take only images still short of max_det
    rounds_of_blocked = list(rounds)
    first_block_kept = [int(matrix_nms(det[i:i + 1, :block], [block], 0.4).sum()) for i in range(5)]
    rounds = rounds_of_blocked
    assert rounds[:3] == [2, 2, 1]
    assert sum(rounds[3:]) >= sum(kept < max_det for kept in first_block_kept)
    assert (sum(rounds[3:]) < 5) if max_det == 190 else (sum(rounds[3:]) >= 5)     # both cases seen


def test_nms_method_is_checked():
    with pytest.raises(ValueError, match="NMS method 'fast'"):
        non_max_suppression(torch.zeros(1, 4, 7), method="fast")


@pytest.mark.parametrize("method", ["matrix", "blocked"])
def test_an_iou_exactly_at_the_threshold_suppresses_as_torchvision_does(method):
    """IoU 0.6 in float32 rounds above the threshold 0.6: torchvision (float32 IoU against a double) suppresses."""
    pred = torch.tensor([[[3.0, 5.0, 6.0, 10.0, 0.8, 1.0], [5.0, 5.0, 10.0, 10.0, 0.9, 1.0]]])   # cx, cy, w, h
    reference = non_max_suppression(pred, 0.1, 0.6, method="per_image")
    assert len(reference[0]) == 1
    torch.testing.assert_close(non_max_suppression(pred, 0.1, 0.6, method=method)[0], reference[0], rtol=0, atol=0)


def test_auto_is_the_blocked_rounds_on_cuda_and_for_few_candidates_torchvision_for_many_on_the_cpu():
    assert resolved_nms_method("auto", torch.device("cuda", 0), 5000) == "blocked"
    assert resolved_nms_method("auto", torch.device("cpu"), 5000) == "per_image"
    assert resolved_nms_method("auto", torch.device("cpu"), 40) == "blocked"       # a prediction: no torchvision
    assert resolved_nms_method("matrix", torch.device("cuda"), 40) == "matrix"

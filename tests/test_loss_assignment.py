"""YoloLoss's target assignment on hand-placed boxes: YOLOv4's best anchor, YOLOv5's neighbour cells, YOLOv4's
ignore threshold against the inference decode."""
import pytest
import torch
from torchvision.ops import box_iou

from nets.yolo import make_config
from nets.yolo_training import YoloLoss, load_hyp
from utils.ops.boxes import cxcywh_to_xyxy, flatten_levels, split_level
from utils.data.loader import per_image_targets

from loss_helpers import positives_at, v4_loss


def test_v4_box_equal_to_p5_anchor():
    # 135x169 px = anchor 4, the middle anchor of the P5 mask [3, 4, 5]; centre (200, 150) px at 416
    target = torch.tensor([[0, 2, 200 / 416, 150 / 416, 135 / 416, 169 / 416]])
    strict = v4_loss(size=416, anchor_iou_thresh=1.0)      # best anchor only
    b, a, gj, gi, tbox, tcls = positives_at(strict, target, 0)
    assert b.tolist() == [0] and a.tolist() == [1] and tcls.tolist() == [2]
    assert (gj.item(), gi.item()) == (4, 6)                 # 150/32 = 4.69, 200/32 = 6.25
    assert torch.allclose(tbox, torch.tensor([[0.25, 0.6875, 135 / 32, 169 / 32]]), atol=1e-5)
    # its best anchor is not in the P4 mask: nothing assigned there
    b4, *_ = positives_at(strict, target, 1)
    assert b4.numel() == 0
    # with yolov4's iou_thresh 0.213: anchor 3 (81x82, IoU 0.288) is added, anchor 5 (344x319, IoU 0.208) is not;
    # anchor 3 is also in the P4 mask (index 2), so P4 gets it too
    crit = v4_loss(size=416)
    b, a, gj, gi, _, _ = positives_at(crit, target, 0)
    assert sorted(a.tolist()) == [0, 1] and set(gj.tolist()) == {4} and set(gi.tolist()) == {6}
    b4, a4, gj4, gi4, _, _ = positives_at(crit, target, 1)
    assert a4.tolist() == [2] and (gj4.item(), gi4.item()) == (9, 12)


def test_v4_assignment_is_vectorised_over_images_and_edges():
    targets = torch.tensor([[0, 0, 0.5, 0.5, 135 / 416, 169 / 416],
                            [3, 1, 0.999, 1.0, 135 / 416, 169 / 416],   # centre on the far edge: clamped
                            [2, 0, 0.5, 0.5, 10 / 416, 14 / 416]])      # best anchor 0: in no mask
    crit = v4_loss(size=416, anchor_iou_thresh=1.0)
    b, a, gj, gi, tbox, tcls = positives_at(crit, targets, 0)
    assert b.tolist() == [0, 3] and a.tolist() == [1, 1] and tcls.tolist() == [0, 1]
    assert gj.tolist() == [6, 12] and gi.tolist() == [6, 12]
    assert (tbox[:, :2] >= 0).all() and (tbox[:, :2] <= 1).all()


def v5_loss():
    config = make_config("yolov5s", 0, ["a", "b"], input_shape=(640, 640))
    return YoloLoss(config, load_hyp("yolov5s"))


def test_v5_neighbour_cells():
    crit = v5_loss()
    assert crit.anchors_mask == [[6, 7, 8], [3, 4, 5], [0, 1, 2]]
    # 156x198 px (anchor 7) centred 0.3 into cell (gi=5, gj=7) of the 20x20 level
    target = torch.tensor([[0, 1, 5.3 / 20, 7.3 / 20, 156 / 640, 198 / 640]])
    b, a, gj, gi, tbox, tcls = positives_at(crit, target, 0)
    # all three anchors are within ratio 4; each gets the cell, its left and its upper neighbour
    got = sorted(zip(a.tolist(), gj.tolist(), gi.tolist()))
    assert got == sorted((k, j, i) for k in range(3) for j, i in [(7, 5), (7, 4), (6, 5)])
    assert len(b) == 9 and set(tcls.tolist()) == {1}
    for (k, j, i), box in zip(zip(a.tolist(), gj.tolist(), gi.tolist()), tbox):
        assert torch.allclose(box[:2], torch.tensor([5.3 - i, 7.3 - j]), atol=1e-5)
        assert -0.5 <= box[:2].min() and box[:2].max() <= 1.5   # reachable by 2*sigmoid - 0.5
        assert torch.allclose(box[2:], torch.tensor([156 / 32, 198 / 32]), atol=1e-5)
    # at 40x40 only 59x119 (index 2 of [3, 4, 5]) is within ratio 4; centre 0.6 into its cell -> right and down
    b, a, gj, gi, _, _ = positives_at(crit, target, 1)
    assert sorted(zip(a.tolist(), gj.tolist(), gi.tolist())) == [(2, 14, 10), (2, 14, 11), (2, 15, 10)]
    # a box much larger than every anchor of a level matches none there
    b, *_ = positives_at(crit, target, 2)
    assert b.numel() == 0


def test_v5_first_cell_has_no_outside_neighbours():
    crit = v5_loss()
    target = torch.tensor([[0, 0, 0.3 / 20, 0.3 / 20, 156 / 640, 198 / 640]])
    b, a, gj, gi, _, _ = positives_at(crit, target, 0)
    assert sorted(a.tolist()) == [0, 1, 2] and set(gj.tolist()) == {0} and set(gi.tolist()) == {0}


def test_v5_loss_runs_on_constructed_outputs():
    crit = v5_loss()
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(2, 3 * 7, 640 // s, 640 // s, generator=g, requires_grad=True) for s in (32, 16, 8)]
    targets = torch.tensor([[0, 1, 0.3, 0.4, 0.25, 0.3], [1, 0, 0.6, 0.5, 0.05, 0.08]])
    loss, parts = crit(out, per_image_targets(targets, 2))
    assert torch.isfinite(loss) and all(v > 0 for v in parts.values())
    loss.backward()
    assert all(torch.isfinite(o.grad).all() for o in out)


# ---------------------------------------------------------------- ignore threshold

@pytest.mark.parametrize("ignore_thresh", [0.5, None])      # None: the YOLOv4-tiny hyp file's
def test_ignore_threshold_matches_inference_decode(ignore_thresh):
    """The objectness weight is 0 exactly where a non-positive prediction overlaps a box by more than the
    head's ignore_thresh, with predictions decoded by the inference path (Head.decode_outputs)."""
    crit = v4_loss(num_classes=1, size=416, **({} if ignore_thresh is None else {"ignore_thresh": ignore_thresh}))
    target = torch.tensor([[0, 0, 200 / 416, 150 / 416, 135 / 416, 169 / 416]])
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 3 * 6, 13, 13, generator=g) * 0.5
    p = split_level(raw, 3)
    # anchor 5 (344x319) at the centre cell predicts the box exactly: it is not a positive (IoU 0.208 < 0.213)
    xy = ((torch.tensor([0.25, 0.6875]) + 0.025) / 1.05).logit()
    p[0, 2, 4, 6, :4] = torch.cat([xy, torch.tensor([135 / 344, 169 / 319]).log()])
    (b, a, gj, gi, _, _), = crit.positives([raw], per_image_targets(target, 1))   # the P5 level only
    cells = crit.cells([raw])
    preds = flatten_levels([raw], cells.anchors_per_level)          # 1,507,6
    tobj = torch.zeros(1, 507)
    tobj[b, (a * 13 + gj) * 13 + gi] = 1
    exact = (2 * 13 + 4) * 13 + 6
    assert tobj[0, exact] == 0
    grouped = per_image_targets(target, 1)                                           # 1,1,6
    weight = crit.head.counted(preds, cells, grouped, grouped[..., 0] >= 0, tobj, crit.input_shape)
    # padding rows (image -1, as in a batch where another image has more boxes) change nothing
    padded = torch.cat([grouped, torch.tensor([[[-1, 0, 0.5, 0.5, 0.9, 0.9]] * 2])], 1)   # 1,3,6
    per_image = crit.head.counted(preds, cells, padded, padded[..., 0] >= 0, tobj, crit.input_shape)
    assert torch.equal(weight, per_image)
    assert weight[0, exact] == 0
    decoded = crit.head.decode_outputs([raw], cells)[0]                               # 507, 6
    iou = box_iou(cxcywh_to_xyxy(decoded[:, :4]), cxcywh_to_xyxy(target[:, 2:] * 416)).squeeze(1)
    threshold = crit.head.ignore_thresh
    assert 0 < threshold < 1
    expected = ((iou <= threshold) | (tobj.flatten() > 0)).float().view(1, 507)
    assert torch.equal(weight, expected)

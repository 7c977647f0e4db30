"""Heads as objects (nets/heads.py) and the one batch contract of both data paths (utils/data/loader.py)."""
from __future__ import annotations

import pytest
import torch

from nets.heads import HEADS, Head, YoloV4Head, YoloV5Head, build_head
from nets.yolo import make_config
from nets.yolo_training import YoloLoss, load_hyp
from utils.ops.boxes import CellCache
from utils.data.loader import collate, to_training_batch


def raw(*shape: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- decoding

def test_v5_decode_formulas():
    head, t, anchors = YoloV5Head(), raw(50, 2), torch.rand(50, 2) * 100 + 1
    torch.testing.assert_close(head.decode_xy(t), 2 * t.sigmoid() - 0.5)
    torch.testing.assert_close(head.decode_wh(t, anchors), (2 * t.sigmoid()) ** 2 * anchors)
    # centres reach -0.5..1.5 of the cell, sizes 0..4 anchors
    assert head.decode_xy(torch.tensor([-50.0, 50.0])).tolist() == [-0.5, 1.5]


def test_v4_decode_formulas():
    head, t, anchors = YoloV4Head(), raw(50, 2, scale=10.0), torch.rand(50, 2) * 100 + 1
    torch.testing.assert_close(head.decode_xy(t), 1.05 * t.sigmoid() - 0.025)
    torch.testing.assert_close(head.decode_wh(t, anchors), t.clamp(-8, 8).exp() * anchors)
    # beyond +-8 the size stops growing / shrinking: finite and non-zero
    big = head.decode_wh(torch.tensor([100.0, -100.0]), torch.ones(2))
    torch.testing.assert_close(big, torch.tensor([8.0, -8.0]).exp())


@pytest.mark.parametrize("style", ["yolov4", "yolov5"])
def test_full_map_decode_uses_the_cell_grid_and_anchors(style):
    """decode_outputs: (xy + cell corner) x stride, wh from each slot's anchor, sigmoid scores."""
    config = make_config("yolov4-tiny", 0, ["a", "b"], (64, 64), head=style)
    head = build_head(config)
    anchors = torch.tensor(config["anchors"])
    cells = CellCache([anchors[m] for m in config["anchors_mask"]], 64)
    outputs = [raw(2, 21, 2, 2, seed=1), raw(2, 21, 4, 4, seed=2)]
    decoded = head.decode_outputs(outputs, cells(outputs))                           # 2,60,7
    assert decoded.shape == (2, 3 * 4 + 3 * 16, 7)
    # slot (anchor 1, row 1, col 0) of the 4x4 level: stride 16, anchor mask[1][1]
    p = outputs[1].view(2, 3, 7, 4, 4)[:, 1, :, 1, 0]                                # 2,7
    slot = 12 + (1 * 4 + 1) * 4 + 0
    xy = (head.decode_xy(p[:, :2]) + torch.tensor([0.0, 1.0])) * 16
    wh = head.decode_wh(p[:, 2:4], anchors[config["anchors_mask"][1][1]])
    torch.testing.assert_close(decoded[:, slot], torch.cat([xy, wh, p[:, 4:].sigmoid()], 1))


# ---------------------------------------------------------------- build_head

def test_build_head_defaults_to_the_family_and_refuses_unknown_styles():
    v4 = make_config("yolov4-tiny", 0, ["a"])
    v5 = make_config("yolov5s", 0, ["a"])
    assert type(build_head({**v4, "head": None})) is YoloV4Head
    assert type(build_head({k: v for k, v in v5.items() if k != "head"})) is YoloV5Head
    # a config may name the other family's style
    assert type(build_head({**v4, "head": "yolov5"})) is YoloV5Head
    with pytest.raises(ValueError, match="yolov4, yolov5"):
        build_head({**v4, "head": "yolov3"})
    assert set(HEADS) == {"yolov4", "yolov5"} and all(issubclass(h, Head) for h in HEADS.values())
    # a head compares equal to its style name
    assert build_head(v4) == "yolov4" and build_head(v5) != "yolov4"


def test_build_head_takes_its_settings_from_hyp():
    v4 = build_head(make_config("yolov4-tiny", 0, ["a"]), load_hyp("yolov4-tiny"))
    assert v4.ignore_thresh == load_hyp("yolov4-tiny")["ignore_thresh"] and v4.anchor_iou_thresh < 1
    plain = build_head(make_config("yolov4-tiny", 0, ["a"]))                         # inference: no hyp
    assert plain.ignore_thresh is None and plain.anchor_iou_thresh == 1.0
    v5 = build_head(make_config("yolov5s", 0, ["a"]), {"anchor_t": 3.0})
    assert v5.anchor_t == 3.0
    # the loss holds the head built from its config and hyp
    loss = YoloLoss(make_config("yolov5s", 0, ["a"]), load_hyp("yolov5s"))
    assert isinstance(loss.head, YoloV5Head)


# ---------------------------------------------------------------- objectness and ignore rule

def test_objectness_targets():
    box_loss = torch.tensor([0.0, 0.25, 1.0, 1.7], requires_grad=True)
    v5 = YoloV5Head().objectness_target(box_loss)
    assert v5.tolist() == [1.0, 0.75, 0.0, 0.0] and not v5.requires_grad            # detached, clamped at 0
    assert YoloV4Head().objectness_target(box_loss).tolist() == [1.0] * 4


def test_objectness_iou_ratio_blends_one_and_the_iou():
    """hyp obj_iou_ratio r (ultralytics' gr): target (1 - r) + r IoU; absent, each head keeps its own."""
    box_loss = torch.tensor([0.0, 0.25, 1.0, 1.7])
    for head in (YoloV4Head(obj_iou_ratio=0.5), YoloV5Head(obj_iou_ratio=0.5)):
        torch.testing.assert_close(head.objectness_target(box_loss), torch.tensor([1.0, 0.875, 0.5, 0.5]))
    assert YoloV4Head(obj_iou_ratio=1.0).objectness_target(box_loss).tolist() == [1.0, 0.75, 0.0, 0.0]
    assert YoloV5Head(obj_iou_ratio=0.0).objectness_target(box_loss).tolist() == [1.0] * 4
    v4_hyp = load_hyp("yolov4-tiny")
    assert build_head(make_config("yolov4-tiny", 0, ["a"]), v4_hyp).obj_iou_ratio == 0.0
    assert build_head(make_config("yolov4-tiny", 0, ["a"], head="yolov5"), v4_hyp).obj_iou_ratio == 1.0
    tuned = build_head(make_config("yolov4-tiny", 0, ["a"]), {**v4_hyp, "obj_iou_ratio": 1.0})
    assert tuned.obj_iou_ratio == 1.0 and tuned.ignore_thresh == v4_hyp["ignore_thresh"]
    assert tuned != build_head(make_config("yolov4-tiny", 0, ["a"]), v4_hyp)      # a setting of the head


def test_only_v4_with_a_threshold_ignores_predictions():
    config = make_config("yolov4-tiny", 0, ["a"], (64, 64))
    anchors = torch.tensor(config["anchors"])
    outputs = [torch.zeros(1, 18, 2, 2), torch.zeros(1, 18, 4, 4)]
    cells = CellCache([anchors[m] for m in config["anchors_mask"]], 64)(outputs)
    preds = torch.zeros(1, 60, 6)
    targets = torch.tensor([[[0, 0, 0.5, 0.5, 0.5, 0.5]]])                         # 1,1,6: every anchor overlaps it
    tobj = torch.zeros(1, 60)
    tobj[0, :5] = 1                                                                  # five positives
    args = (preds, cells, targets, targets[..., 0] >= 0, tobj, (64, 64))
    assert (YoloV5Head().counted(*args) == 1).all()
    assert (YoloV4Head().counted(*args) == 1).all()                                # no ignore_thresh
    assert (YoloV4Head(ignore_thresh=0.99).counted(*args) == 1).all()               # no prediction fits that well
    ignored = YoloV4Head(ignore_thresh=0.0).counted(*args)                          # any overlap is ignored...
    assert (ignored[0, :5] == 1).all() and (ignored[0, 5:] == 0).all()               # ...but positives count


# ---------------------------------------------------------------- one batch contract

def test_cpu_collate_gives_per_image_targets_with_padding():
    images = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    boxes = [torch.rand(2, 5), torch.zeros(0, 5), torch.rand(3, 5)]
    batch_images, targets = collate(list(zip(images, boxes)))
    assert batch_images.dtype == torch.uint8 and batch_images.shape == (3, 3, 8, 8)
    assert targets.shape == (3, 3, 6) and targets.dtype == torch.float32
    assert targets[..., 0].tolist() == [[0, 0, -1], [-1, -1, -1], [2, 2, 2]]
    torch.testing.assert_close(targets[0, :2, 1:], boxes[0])
    torch.testing.assert_close(targets[2, :, 1:], boxes[2])
    # no boxes anywhere: still one (padding) row per image
    _, empty = collate([(images[0], torch.zeros(0, 5))] * 2)
    assert empty.shape == (2, 1, 6) and (empty[..., 0] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_to_training_batch_gives_float_images_in_0_1(dtype):
    images = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1, 1)                # 2,3,1,256: every level
    targets = torch.full((2, 1, 6), -1.0, dtype=torch.float64)
    out, t = to_training_batch(images, targets, torch.device("cpu"), dtype)
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.equal(out, (images.float() / 255).to(dtype))
    assert out.min() == 0 and out.max() == 1
    assert t.dtype == torch.float32 and torch.equal(t, targets.float())


def test_v4_box_whose_best_anchor_no_level_reads_goes_to_the_best_read_anchor():
    """YOLOv4-tiny's masks never read anchor 0 (10x14): a 10x10 box (best anchor 0; IoU 0.16 with anchor 1, under
    the extra-anchor threshold 0.213) must still be trained, on the 26x26 level's anchor 1 (23x27), the best
    of the read ones; before, it was assigned nowhere."""
    config = make_config("yolov4-tiny", 0, ["a"], (416, 416))
    loss = YoloLoss(config, load_hyp("yolov4-tiny"))
    outputs = [torch.zeros(1, 18, 13, 13), torch.zeros(1, 18, 26, 26)]
    small = torch.tensor([[[0, 0, 0.5, 0.5, 10 / 416, 10 / 416]]])
    coarse, fine = loss.positives(outputs, small)
    assert len(coarse[0]) == 0 and len(fine[0]) == 1
    assert fine[1].tolist() == [0]            # position 0 of the fine mask [1, 2, 3] is anchor 1
    # a box that best fits a read anchor is unchanged: 81x82 is anchor 3, on both levels, plus anchor 4
    # (135x169, IoU 0.29 > 0.213) on the coarse one and anchor 2 (37x58, IoU 0.32) on the fine one
    mid = torch.tensor([[[0, 0, 0.5, 0.5, 81 / 416, 82 / 416]]])
    coarse, fine = loss.positives(outputs, mid)
    assert coarse[1].tolist() == [0, 1] and fine[1].tolist() == [1, 2]

"""The training recipe per family (lr schedule, mosaic share, best.pt fitness) and the evaluation protocol."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

import get_map
from nets.common import ConvBNAct
from nets.yolo import MODEL_DATA
from nets.yolo_training import RECIPE_DEFAULTS, load_hyp
from utils.config import EVAL_DETECTION, PREDICT_DETECTION, TrainConfig
from utils.engine.evaluate import checkpoint_fitness
from utils.engine.optim import build_optimizer, lr_lambda, warmup
from utils.config import parse_train_flags
from utils.engine.run import resolve_run, resolved_hyp, resumed_hyp


def test_linear_schedule_falls_from_one_to_lrf():
    lf = lr_lambda("linear", 100, 0.01)
    assert [lf(e) for e in (0, 50, 99, 100)] == pytest.approx([1.0, 0.505, 0.0199, 0.01])
    cos = lr_lambda("cos", 100, 0.01)
    assert cos(50) == pytest.approx(0.505) and cos(25) == pytest.approx(1 - 0.99 * (1 - math.cos(math.pi / 4)) / 2)
    assert cos(25) > lf(25)                         # cosine stays higher early, lower late
    with pytest.raises(ValueError, match="cos, linear or step"):
        lr_lambda("poly", 100, 0.01)


def test_fitness_weights_map50_95():
    metrics = {"map50": 0.9, "map50_95": 0.5}
    assert checkpoint_fitness(metrics, 0.9) == pytest.approx(0.54)
    assert checkpoint_fitness(metrics, 0.0) == pytest.approx(0.9)
    # an epoch of higher mAP50 but looser boxes loses under the YOLOv5 weights
    assert checkpoint_fitness({"map50": 0.91, "map50_95": 0.52}, 0.9) < checkpoint_fitness(
        {"map50": 0.89, "map50_95": 0.56}, 0.9)
    assert checkpoint_fitness({"map50": float("nan"), "map50_95": float("nan")}, 0.9) == 0.0


@pytest.mark.parametrize("model, schedule, mosaic_share, weight", [
    ("yolov5n", "linear", 1.0, 0.9),          # ultralytics YOLOv5 v7.0's recipe
    ("yolov5s", "linear", 1.0, 0.9),
    ("yolov4-tiny", "cos", 0.7, 0.9),         # its own schedule and mosaic share; best.pt as YOLOv5
])
def test_family_recipes(model, schedule, mosaic_share, weight):
    hyp = resolved_hyp(load_hyp(model), TrainConfig())
    assert (hyp["lr_schedule"], hyp["special_aug_ratio"], hyp["fitness_map50_95"]) == (schedule, mosaic_share, weight)


def test_flags_override_the_recipe():
    given = parse_train_flags(["--model", "yolov5n", "--lr-schedule", "cos", "--special-aug-ratio", "0.7",
                               "--fitness-map50-95", "0"])
    hyp = resolved_hyp(load_hyp("yolov5n"), resolve_run(given).config.train)
    assert (hyp["lr_schedule"], hyp["special_aug_ratio"], hyp["fitness_map50_95"]) == ("cos", 0.7, 0.0)
    with pytest.raises(SystemExit):                         # argparse: not one of the choices
        parse_train_flags(["--lr-schedule", "poly"])
    with pytest.raises(ValueError, match="--fitness-map50-95 1.5: must be between 0.0 and 1.0"):
        resolve_run(parse_train_flags(["--fitness-map50-95", "1.5"]))


def test_a_hyp_file_without_the_recipe_keys_gets_the_old_behaviour(tmp_path):
    shipped = yaml.safe_load((MODEL_DATA / "hyp.scratch-low.yaml").read_text())
    old = {k: v for k, v in shipped.items() if k not in RECIPE_DEFAULTS}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    hyp = load_hyp("yolov5n", path)
    assert (hyp["lr_schedule"], hyp["special_aug_ratio"], hyp["fitness_map50_95"]) == ("cos", 0.7, 0.0)
    path.write_text(yaml.safe_dump({**old, "lr_schedule": "poly"}))
    with pytest.raises(ValueError, match="lr_schedule 'poly'"):
        load_hyp("yolov5n", path)
    path.write_text(yaml.safe_dump({**old, "obj_iou_ratio": 2}))
    with pytest.raises(ValueError, match="obj_iou_ratio must be"):
        load_hyp("yolov5n", path)


def test_a_resumed_run_keeps_its_recipe():
    """The checkpoint's hyp wins; keys it predates come from its stored flags, else the old behaviour."""
    new = {"hyp": {**load_hyp("yolov5n"), "lr0": 0.01}}
    assert resumed_hyp(new, TrainConfig(lr_schedule="step"))["lr_schedule"] == "linear"
    older = {"hyp": {k: v for k, v in new["hyp"].items() if k not in RECIPE_DEFAULTS}}
    assert resumed_hyp(older, TrainConfig(lr_schedule="step", special_aug_ratio=0.5)) == {
        **older["hyp"], "lr_schedule": "step", "special_aug_ratio": 0.5, "fitness_map50_95": 0.0}
    assert resumed_hyp(older, TrainConfig(lr=0.002))["lr0"] == 0.002


def test_evaluation_uses_the_coco_style_protocol():
    """conf 0.001, NMS IoU 0.6 and every class per box for mAP (as ultralytics val.py); prediction keeps its own."""
    assert (EVAL_DETECTION.conf, EVAL_DETECTION.nms_iou, EVAL_DETECTION.multi_label) == (0.001, 0.6, True)
    assert (PREDICT_DETECTION.conf, PREDICT_DETECTION.nms_iou, PREDICT_DETECTION.multi_label) == (0.25, 0.3, False)
    assert get_map.parse_args(["--weights", "w.pt"]).detect == EVAL_DETECTION
    old = get_map.parse_args(["--weights", "w.pt", "--nms-iou", "0.5", "--no-multi-label"]).detect
    assert (old.nms_iou, old.multi_label) == (0.5, False)


def test_parameter_groups_and_warm_up_follow_ultralytics():
    """Decay on conv weights only; halfway through warm-up: weights at half lr, bias lr halfway down from 0.1,
    momentum halfway up from 0.8."""
    model = torch.nn.Sequential(ConvBNAct(3, 4, 3), torch.nn.Conv2d(4, 6, 1))
    opt = build_optimizer(model, "sgd", 0.01, 0.937, 0.0005)
    norm, decayed, biases = opt.param_groups
    same = lambda group, params: [id(p) for p in group["params"]] == [id(p) for p in params]   # noqa: E731
    assert same(norm, [model[0].bn.weight]) and norm["weight_decay"] == 0
    assert [p.ndim for p in decayed["params"]] == [4, 4] and decayed["weight_decay"] == 0.0005
    assert same(biases, [model[0].bn.bias, model[1].bias]) and biases["weight_decay"] == 0
    hyp = load_hyp("yolov5n")
    warmup(opt, 50, 100, 1.0, hyp, sgd=True)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.005, 0.055])
    assert {round(g["momentum"], 6) for g in opt.param_groups} == {0.8685}

"""Evaluation with a gray margin around each image (get_map.py --margin): the rectangular input that
ultralytics' val.py feeds, its geometry, and boxes mapped back to the original pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import get_map
import train
from utils.data.sample_data import make_sample_dataset
from utils.ops.images import GRAY, letterbox, margin_canvas
from yolo import YOLO


def test_margin_canvas_rounds_up_to_the_stride_with_the_margin():
    assert margin_canvas([(312, 416)], 0.5) == (352, 448)        # ultralytics' val.py shape for 4:3 at 416
    assert margin_canvas([(312, 416)], 0.0) == (320, 416)
    assert margin_canvas([(416, 416)], 0.5) == (448, 448)
    assert margin_canvas([(312, 416), (416, 234)], 0.5) == (448, 448)   # the batch's largest sides
    assert margin_canvas([(40, 64)], 1.0, stride=16) == (64, 80)


def test_letterbox_on_a_canvas_centres_the_fitted_image():
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    plain, r, _ = letterbox(image, (64, 64))
    out, r2, (px, py) = letterbox(image, (64, 64), canvas=(64, 96))
    assert out.shape == (64, 96, 3) and r2 == r and (px, py) == (16.0, 8.0)
    np.testing.assert_array_equal(out[8:56, 16:80], plain[8:56])
    assert (out[:8] == GRAY).all() and (out[:, :16] == GRAY).all() and (out[:, 80:] == GRAY).all()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))
    run_dir = train.main(["--data", str(data), "--epochs", "1", "--img", "64", "--batch", "4", "--workers", "0",
                          "--device", "cpu", "--save-dir", str(tmp_path_factory.mktemp("logs")), "--name", "r"])
    return data, run_dir / "best.pt"


def test_yolo_with_a_margin_feeds_the_canvas_and_maps_boxes_back(run):
    _, weights = run
    plain = YOLO(weights, device="cpu")
    wide = YOLO(weights, device="cpu", margin=0.5)
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    batch, metas = wide.preprocess([image])
    assert tuple(batch.shape) == (1, 3, 64, 96)
    assert tuple(metas[0][:4]) == (1.0, 1.0, 16.0, 8.0)
    # a box over the whole image in input pixels is the whole image in original pixels
    whole = torch.tensor([[16.0, 8.0, 80.0, 56.0, 0.9, 0.0]])
    np.testing.assert_allclose(wide.to_original([whole], metas)[0][0, :4], [0, 0, 64, 48])
    # the cells of the wider input keep the model's strides
    outputs = wide.forward(batch.to(wide.device))
    strides = set(wide.cells(outputs, batch.shape[-2]).stride.flatten().tolist())
    assert strides == set(plain.cells(plain.forward(plain.preprocess([image])[0])).stride.flatten().tolist())
    assert len(wide.predict(image)) == 1
    with pytest.raises(ValueError, match="margin"):
        wide.preprocess_tensors([torch.zeros(3, 48, 64, dtype=torch.uint8)])


def test_get_map_margin_flag_is_used_and_recorded(run, tmp_path):
    data, weights = run
    summary = get_map.main(["--weights", str(weights), "--data", str(data), "--out", str(tmp_path / "m"),
                            "--margin", "0.5", "--device", "cpu"])
    assert summary["margin"] == 0.5
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["margin"] == 0.5
    with pytest.raises(ValueError, match="--margin -1.0: must be between 0.0 and 4.0"):
        get_map.parse_args(["--weights", str(weights), "--margin", "-1"])

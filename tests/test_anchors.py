"""Anchors fitted to the data: k-means recovers planted clusters, evolution only improves the fitness, the recall
check at train start, --anchors FILE, and the anchors tool writing model_data/-format files."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from nets.yolo import model_config, read_anchors
from utils.data.dataset import Record
from utils.data.sample_data import make_sample_dataset
from utils.engine.anchors import MIN_BPR, choose_anchors, read_anchors_file, training_wh
from utils.config import parse_train_flags
from utils.engine.run import resolve_run
from utils.ops.anchors import best_possible_recall, evolve, fit_anchors, fitness, kmeans_iou
from utils.tools import anchors as anchors_tool

CENTRES = np.array([[8, 12], [20, 14], [24, 40], [60, 50], [90, 150], [200, 180]], np.float64)


def planted(n_per: int = 200, spread: float = 0.04, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c * np.exp(rng.normal(0, spread, (n_per, 2))) for c in CENTRES])


def test_kmeans_recovers_planted_clusters():
    found = kmeans_iou(planted(), 6, seed=0)
    np.testing.assert_allclose(found, CENTRES, rtol=0.05)            # sorted small to large, as planted
    np.testing.assert_array_equal(kmeans_iou(planted(), 6, seed=0), found)


def test_fit_is_deterministic_sorted_and_evolution_never_loses_fitness():
    wh = planted(spread=0.3)
    a = fit_anchors(wh, 6, seed=3, generations=300)
    np.testing.assert_array_equal(a, fit_anchors(wh, 6, seed=3, generations=300))
    assert (np.diff(a.prod(1)) >= 0).all()
    start = kmeans_iou(wh, 6, seed=3)
    assert fitness(wh, evolve(wh, start, generations=300, seed=3)) >= fitness(wh, start)
    bad = np.full((6, 2), 4.0)                                         # far too small for these boxes
    assert best_possible_recall(wh, bad) < 0.2 and best_possible_recall(wh, a) > 0.99


def _records(scale: float) -> list[Record]:
    boxes = np.array([[0, 0, 8, 12], [10, 10, 30, 24], [0, 0, 24, 40], [5, 5, 65, 55]], np.float32) * scale
    return [Record("x.jpg", boxes, np.zeros(4, np.int64), np.zeros(4, bool), 416, 416, "x")] * 30


def test_training_wh_is_at_the_input_size():
    rec = Record("x.jpg", np.array([[0, 0, 100, 50]], np.float32), np.zeros(1, np.int64), np.zeros(1, bool),
                 200, 400, "x")
    np.testing.assert_allclose(training_wh([rec], [416, 416]), [[104, 52]])     # scaled by 416 / 400


def test_recall_check_warns_and_auto_refits(caplog):
    config = model_config("yolov5s", 0, ["a"], (416, 416))
    with caplog.at_level(logging.INFO):
        same = choose_anchors(config, _records(0.05), None, 4.0)      # boxes of 0.4-3 px: defaults fit badly
    assert same.anchors == config.anchors
    assert any("fit the training boxes badly" in r.message and "--anchors auto" in r.message for r in caplog.records)
    wh = training_wh(_records(0.5), config.input_shape)
    fitted = choose_anchors(config, _records(0.5), "auto", 4.0)
    assert len(fitted.anchors) == 9 and fitted.anchors_mask == config.anchors_mask
    assert best_possible_recall(wh, np.array(fitted.anchors)) >= MIN_BPR
    assert fitness(wh, np.array(fitted.anchors)) > fitness(wh, np.array(config.anchors))
    with pytest.raises(ValueError, match="--anchors auto: 4 boxes of at least 2 px cannot place 9 anchors"):
        choose_anchors(config, _records(0.5)[:1], "auto", 4.0)


def test_anchors_file_flag(tmp_path):
    good = tmp_path / "six.txt"
    good.write_text("10,14, 23,27, 37,58, 81,82, 135,169, 344,319\n")
    assert read_anchors_file(str(good), "yolov4-tiny")[0] == [10, 14]
    with pytest.raises(ValueError, match="yolov5s needs 9 positive w,h pairs, the file has 6"):
        read_anchors_file(str(good), "yolov5s")
    # a missing file is refused with the flags, before anything is loaded or written
    with pytest.raises(ValueError, match="--anchors nope.txt: no such file"):
        resolve_run(parse_train_flags(["--anchors", "nope.txt", "--data", str(tmp_path / "x"),
                                       "--save-dir", str(tmp_path / "logs")]))
    assert not (tmp_path / "logs").exists()


def test_anchors_tool_writes_a_file_train_reads(tmp_path, capsys):
    data = make_sample_dataset(tmp_path / "voc", n_train=6, n_val=2, n_test=2, size=(64, 64))
    out = anchors_tool.main(["--data", str(data), "--img", "64", "--model", "yolov5n", "--generations", "200",
                             "--out", str(tmp_path / "a.txt")])
    anchors = read_anchors(out)
    assert len(anchors) == 9 and read_anchors_file(str(out), "yolov5n") == anchors
    assert max(max(a) for a in anchors) < 64 and (np.diff(np.prod(anchors, 1)) >= 0).all()
    printed = capsys.readouterr().out
    assert "best possible recall" in printed and "--anchors " + str(out) in printed


def test_auto_fits_only_the_anchors_a_level_reads():
    """YOLOv4-tiny's masks read anchors 1-5: 'auto' fits five, in area order into those slots; slot 0 copies slot 1.

    Fitting six would put the smallest cluster (here the 8x12 boxes) into slot 0, where no level reads it."""
    config = model_config("yolov4-tiny", 0, ["a"], (416, 416))
    wh = planted(n_per=20).astype(np.float32)                          # six clusters, 8x12 the smallest
    boxes = np.concatenate([np.zeros_like(wh), wh], 1)                 # x1, y1, x2, y2 from the corner
    records = [Record("x.jpg", boxes, np.zeros(len(boxes), np.int64), np.zeros(len(boxes), bool), 416, 416, "x")]
    fitted = choose_anchors(config, records, "auto", 4.0)
    assert fitted.anchors[0] == fitted.anchors[1]                      # the unread slot copies its neighbour
    used = np.array(fitted.anchors[1:])
    assert (np.diff(np.prod(fitted.anchors, 1)) >= 0).all()            # small to large, slots 1..5 fitted
    wh = training_wh(records, config.input_shape)
    # every box has a read anchor it fits: recall judged on the read anchors only
    assert best_possible_recall(wh, used) >= MIN_BPR
    assert abs(used[0] - [8, 12]).max() < 4                            # the smallest cluster sits in a read slot

"""predict.py's label files and predictions.json: their text, and Outputs writing them a batch at a time."""
import json

import numpy as np
import pytest

import predict
from utils.engine import predict_io
from utils.engine.predict_io import json_objects, json_text, yolo_label_files, yolo_label_text
from utils.ops import fixed_text
from utils.engine.predict_pipeline import Outputs

CLASSES = ["RBC", 'say "hi"\\', "Platelets"]


def detections(n: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    boxes = np.sort(rng.uniform(-5, 700, (n, 2, 2)), axis=1).reshape(n, 4)[:, [0, 2, 1, 3]]
    return np.concatenate([boxes, rng.uniform(0, 1, (n, 1)), rng.integers(0, 3, (n, 1))], 1).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_text_is_box_by_box_formatting(dtype):
    d = detections(30, 0, dtype)
    for score in (False, True):
        expected = ""
        for x1, y1, x2, y2, conf, cls in d:           # the box-by-box rule, in the array's dtype
            line = (f"{int(cls)} {(x1 + x2) / 2 / 640:.6f} {(y1 + y2) / 2 / 480:.6f} "
                    f"{(x2 - x1) / 640:.6f} {(y2 - y1) / 480:.6f}")
            expected += (f"{line} {conf:.5f}" if score else line) + "\n"
        assert yolo_label_text(d, 640, 480, score) == expected
    assert yolo_label_text(np.zeros((0, 6), dtype), 640, 480) == ""


def test_json_objects_parse_to_the_rounded_detections():
    d = detections(40, 1, np.float32)
    parsed = [json.loads(text) for text in json_objects('a "b".jpg', d, CLASSES)]
    for entry, (x1, y1, x2, y2, score, cls) in zip(parsed, d.astype(np.float64).tolist()):
        assert entry == {"image": 'a "b".jpg', "class": int(cls), "class_name": CLASSES[int(cls)],
                         "score": round(score, 5), "box": [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]}
    odd = np.array([[np.nan, 0.123456, 1, 1, 0.1234567, 0], [0, 0, 1, 1, np.inf, 2]])
    parsed = [json.loads(text) for text in json_objects("x", odd, CLASSES)]
    assert [e["class_name"] for e in parsed] == ["RBC", "Platelets"]
    assert parsed[0]["score"] == 0.12346 and parsed[0]["box"][1] == 0.12 and parsed[1]["score"] == float("inf")
    assert json_objects("x", np.zeros((0, 6)), CLASSES) == []
    unknown = np.array([[0, 0, 1, 1, 0.5, 7], [0, 0, 1, 1, np.nan, -1]])              # malformed detections
    assert [json.loads(text)["class_name"] for text in json_objects("x", unknown, CLASSES)] == ["7", "-1"]


def batch_of(seed: int, dtype=np.float32) -> list[tuple[np.ndarray, int, int]]:
    """A batch's (detections, width, height): images without detections among them, boxes inside the images, and
    coordinates on eighths of a pixel, whose 2-decimal forms are ties that round half to even (0.125 -> 0.12)."""
    rng = np.random.default_rng(seed)
    batch = []
    for i in range(9):
        w, h = int(rng.integers(1, 4000)), int(rng.integers(1, 4000))
        n = 0 if i % 4 == 1 else int(rng.integers(1, 40))
        corners = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1) * [w, h]
        boxes = np.round(corners.transpose(0, 2, 1).reshape(n, 4)[:, [0, 2, 1, 3]] * 8) / 8
        d = np.concatenate([boxes, rng.uniform(0, 1, (n, 1)), rng.integers(0, 3, (n, 1))], 1).astype(dtype)
        batch.append((d, w, h))
    batch[0][0][:1, :5] = 0                                                  # zeros
    return batch


def expected_labels(batch, score):
    return [yolo_label_text(d, w, h, score).encode() for d, w, h in batch]


def expected_json(records):
    return ",\n".join(text for name, d in records for text in json_objects(name, d, CLASSES))


@pytest.mark.parametrize("seed", range(4))
def test_batch_label_files_and_json_are_the_image_by_image_texts(seed):
    """The NumPy way (whole batches) writes exactly what formatting box by box writes."""
    batch = batch_of(seed)
    for score in (False, True):
        assert yolo_label_files(batch, score) == expected_labels(batch, score)
        assert predict_io._label_lines(np.concatenate([d for d, _, _ in batch]), batch,
                                       np.array([len(d) for d, _, _ in batch]), score) is not None   # taken
    records = [(f"im{i} \"é\".jpg", d) for i, (d, _, _) in enumerate(batch)]
    assert json_text(records, CLASSES) == expected_json(records)
    assert predict_io._json_lines(np.concatenate([d for _, d in records]), [r for r in records if len(r[1])],
                                  CLASSES) is not None
    assert json_text([("a", np.zeros((0, 6), np.float32))], CLASSES) == ""
    assert yolo_label_files([(np.zeros((0, 6), np.float32), 10, 10)] * 2) == [b"", b""]


@pytest.mark.parametrize("change", ["float64", "one float16", "NumPy sizes", "7 columns", "negative", "minus zero",
                                    "nan", "unknown class", "huge"])
def test_batch_texts_fall_back_to_box_by_box_where_numpy_cannot_be_exact(change):
    batch = batch_of(7)
    d = batch[2][0]
    if change == "float64":
        batch = [(det.astype(np.float64), w, h) for det, w, h in batch]
    elif change == "one float16":
        batch[2] = (d.astype(np.float16), *batch[2][1:])
    elif change == "NumPy sizes":                      # the reference's arithmetic is then float64
        batch = [(det, np.int64(w), np.int64(h)) for det, w, h in batch]
    elif change == "7 columns":                        # the reference formats the first 6 (labels) or refuses (JSON)
        batch[2] = (np.concatenate([d, d[:, :1]], 1), *batch[2][1:])
    elif change == "negative":
        d[0, 0] = -3.5
    elif change == "minus zero":
        d[0, 1] = -0.0
    elif change == "nan":
        d[0, 4] = np.nan
    elif change == "unknown class":
        d[0, 5] = 7
    else:
        d[0, 2] = 3e12
    for score in (False, True):
        assert yolo_label_files(batch, score) == expected_labels(batch, score)
    records = [(f"im{i}", det) for i, (det, _, _) in enumerate(batch)]
    if change == "7 columns":
        with pytest.raises(ValueError):
            expected_json(records)
        with pytest.raises(ValueError):
            json_text(records, CLASSES)
    else:
        assert json_text(records, CLASSES) == expected_json(records)


def test_fixed_text_fields_match_python_formatting():
    values = np.array([0, 0.125, 0.375, 1 / 3, 9.9999995, 123456.78, 2.5, 1e-7, 99999.99], np.float32)
    for decimals in range(1, 7):
        chars, keep = fixed_text.fixed(values, decimals)
        assert [bytes(c[k]).decode() for c, k in zip(chars, keep)] == [f"{v:.{decimals}f}" for v in values.tolist()]
    assert fixed_text.fixed(values.astype(np.float64), 2) is None and fixed_text.fixed(-values[1:], 2) is None
    ints = np.array([0, 7, 10, 99, 100, 12345, 10 ** 11 + 3])
    chars, keep = fixed_text.integers(ints)
    assert [bytes(c[k]).decode() for c, k in zip(chars, keep)] == [str(i) for i in ints.tolist()]
    assert fixed_text.integers(np.array([-1])) is None


class FakeYolo:
    class_names = CLASSES


def test_outputs_write_labels_and_json_a_batch_at_a_time_and_count_every_class(tmp_path):
    args = predict.parse_args(["--weights", "w.pt", "--source", str(tmp_path), "--no-save-images", "--save-txt",
                               "--save-conf", "--save-json"])
    outputs = Outputs(args, FakeYolo(), tmp_path, None)
    found = {}
    for batch in range(3):
        names = [f"{batch}_{i}.jpg" for i in range(4)]
        dets = [detections(i, 10 * batch + i) for i in range(4)]              # image 0 of each batch: nothing
        found.update(zip(names, dets))
        stems, kept = outputs.images(names, [None] * 4, [(480, 640)] * 4, dets)
        assert stems == [n[:-4] for n in names] and all(k is d for k, d in zip(kept, dets))
    outputs.finish()
    assert outputs.totals == {name: sum(int((d[:, 5] == c).sum()) for d in found.values())
                              for c, name in enumerate(CLASSES) if any((d[:, 5] == c).any() for d in found.values())}
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == sorted(f"{n[:-4]}.txt" for n in found)
    for name, det in found.items():
        assert (tmp_path / "labels" / f"{name[:-4]}.txt").read_text() == yolo_label_text(det, 640, 480, True)
    entries = json.loads((tmp_path / "predictions.json").read_text())
    assert [e["image"] for e in entries] == [n for n, det in found.items() for _ in range(len(det))]   # in order
    empty = tmp_path / "empty"
    empty.mkdir()
    outputs = Outputs(args, FakeYolo(), empty, None)
    outputs.images(["none.jpg"], [None], [(480, 640)], [np.zeros((0, 6), np.float32)])
    outputs.finish()
    assert json.loads((empty / "predictions.json").read_text()) == []
    assert (empty / "labels" / "none.txt").read_text() == ""

"""The three data formats: the same sample as VOC, YOLO txt and COCO json gives the same records and the same mAP;
get_map on COCO data agrees with pycocotools on the original json; messy and malformed files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import get_map
import train
from utils.data.dataset import DatasetError, LoadReport
from utils.data.formats import open_data
from utils.data.sample_data import SAMPLE_CLASSES, make_sample_dataset, sample_as_coco, sample_as_yolo
from utils.engine.train_data import load_splits
from utils.config import DataConfig

TINY = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """The same boxes in the three formats: VOC generated, YOLO and COCO written from it."""
    base = tmp_path_factory.mktemp("formats")
    voc = make_sample_dataset(base / "voc", n_train=6, n_val=3, n_test=3, size=(64, 72))
    return {"voc": voc, "yolo": sample_as_yolo(voc, base / "yolo"), "coco": sample_as_coco(voc, base / "coco")}


@pytest.fixture(scope="module")
def weights(sets, tmp_path_factory) -> Path:
    """A tiny model trained one epoch on the COCO copy with fitted anchors."""
    run = train.main(["--data", str(sets["coco"]), "--anchors", "auto", "--save-dir",
                      str(tmp_path_factory.mktemp("logs")), "--name", "r", *TINY])
    return run / "best.pt"


def test_format_is_detected_from_what_data_names(sets):
    assert open_data(str(sets["voc"])).format == "voc"
    assert open_data(str(sets["yolo"])).format == "yolo"
    assert open_data(str(sets["yolo"].parent)).format == "yolo"                 # a folder holding data.yaml
    assert open_data(str(sets["coco"])).format == "coco"
    lone = open_data(str(sets["coco"] / "annotations" / "instances_val.json"))
    assert lone.format == "coco" and not lone.has_split("val")                   # one file: one split, no names
    assert [open_data(str(sets[f])).describe() for f in ("voc", "yolo", "coco")] == \
        ["Pascal VOC", "YOLO txt", "COCO json"]
    with pytest.raises(DatasetError, match="not a dataset"):
        open_data(str(sets["voc"] / "JPEGImages"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_three_loaders_yield_identical_records(sets, split):
    loaded = {f: open_data(str(p)).load(split) for f, p in sets.items()}
    (voc, names) = loaded["voc"]
    assert names == SAMPLE_CLASSES and sum(len(r.boxes) for r in voc) >= 5
    for fmt in ("yolo", "coco"):
        records, fmt_names = loaded[fmt]
        assert fmt_names == names and len(records) == len(voc)
        for a, b in zip(voc, records):
            assert Path(a.image_path).name == Path(b.image_path).name and (a.height, a.width) == (b.height, b.width)
            assert b.boxes.dtype == np.float32 and b.labels.dtype == np.int64
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.difficult, b.difficult)
            # YOLO keeps 6 decimals of the normalised values: under 1e-3 px at these sizes; COCO is exact
            np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3 if fmt == "yolo" else 0)
    assert [r.file_name for r in loaded["yolo"][0]][0] == f"images/{split}/{Path(voc[0].image_path).name}"
    assert [r.file_name for r in loaded["coco"][0]] == [Path(r.image_path).name for r in voc]


def test_training_splits_map_onto_every_format(sets):
    for fmt, path in sets.items():
        splits = load_splits(DataConfig(data=str(path)))
        assert (len(splits.train), len(splits.val), splits.val_source) == (6, 3, "val"), fmt
        assert splits.source.format == fmt


def test_identical_map_through_get_map(sets, weights, tmp_path):
    summaries, truths = {}, {}
    for fmt, path in sets.items():
        out = tmp_path / fmt
        summaries[fmt] = get_map.main(["--weights", str(weights), "--data", str(path), "--split", "train",
                                       "--out", str(out), "--device", "cpu", "--conf", "0"])
        truths[fmt] = json.loads((out / "ground_truth.json").read_text())
        assert summaries[fmt]["format"] == fmt and summaries[fmt]["num_images"] == 6
    assert summaries["voc"]["map50_95"] > 0      # a real number to agree on, not an empty evaluation
    for key in ("map50_voc", "map50", "map50_95"):
        assert summaries["coco"][key] == summaries["voc"][key]
        assert summaries["yolo"][key] == pytest.approx(summaries["voc"][key], abs=1e-3)
    # file_name is the real image file, relative to its folder (VOC JPEGImages/, YOLO path:, COCO <split>/)
    voc_names = [im["file_name"] for im in truths["voc"]["images"]]
    assert all(n.endswith(".jpg") and (sets["voc"] / "JPEGImages" / n).is_file() for n in voc_names)
    assert [im["file_name"] for im in truths["coco"]["images"]] == voc_names
    assert all((sets["yolo"].parent / im["file_name"]).is_file() for im in truths["yolo"]["images"])


def test_coco_map_equals_pycocotools_on_the_original_json(sets, weights, tmp_path):
    """Categories with gappy ids listed out of order, a crowd box: get_map == COCOeval on the file itself."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    data = tmp_path / "coco"
    shutil.copytree(sets["coco"], data)
    original = data / "annotations" / "instances_train.json"
    raw = json.loads(original.read_text())
    new_id = {1: 7, 2: 20, 3: 21, 4: 90}
    raw["categories"] = [dict(c, id=new_id[c["id"]]) for c in reversed(raw["categories"])]
    for a in raw["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    raw["annotations"][0]["iscrowd"] = 1
    raw["images"] = [dict(im, id=im["id"] * 100 + 5) for im in raw["images"]]   # ids of its own, not 1..N
    for a in raw["annotations"]:
        a["image_id"] = a["image_id"] * 100 + 5
    original.write_text(json.dumps(raw))

    records, names = open_data(str(data)).load("train")
    crowd_image = next(im["file_name"] for im in raw["images"] if im["id"] == raw["annotations"][0]["image_id"])
    assert names == SAMPLE_CLASSES and [r.difficult.sum() for r in records if r.file_name == crowd_image] == [1]
    assert sum(r.difficult.sum() for r in records) == 1

    summary = get_map.main(["--weights", str(weights), "--data", str(data), "--split", "train", "--out",
                            str(tmp_path / "out"), "--device", "cpu", "--conf", "0"])
    ours = json.loads((tmp_path / "out" / "ground_truth.json").read_text())
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    # our ids -> the original's, through the real file names and the category names
    image_of = {im["id"]: im["file_name"] for im in ours["images"]}
    orig_image = {im["file_name"]: im["id"] for im in raw["images"]}
    orig_cat = {c["name"]: c["id"] for c in raw["categories"]}
    our_cat = {c["id"]: c["name"] for c in ours["categories"]}
    mapped = [dict(d, image_id=orig_image[image_of[d["image_id"]]], category_id=orig_cat[our_cat[d["category_id"]]])
              for d in dets]
    gt = COCO(str(original))
    ev = COCOeval(gt, gt.loadRes(mapped), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert summary["map50_95"] > 0
    assert summary["map50_95"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert summary["map50"] == pytest.approx(ev.stats[1], abs=1e-12)


def test_auto_anchors_are_stored_in_the_checkpoint(weights):
    config = torch.load(weights, weights_only=True)["config"]
    anchors = np.asarray(config["anchors"])
    assert anchors.shape == (6, 2) and config["anchors_mask"] == [[3, 4, 5], [1, 2, 3]]
    assert (np.diff(anchors.prod(1)) >= 0).all()                 # small to large
    assert anchors.max() < 64                                   # fitted to 64 px inputs, not the 416 px defaults


# ----------------------------------------------------------------------------- messy and malformed YOLO / COCO


def _yolo_copy(sets, tmp_path) -> Path:
    root = tmp_path / "yolo"
    shutil.copytree(sets["yolo"].parent, root)
    return root


def test_yolo_messy_data_is_counted(sets, tmp_path, capsys):
    root = _yolo_copy(sets, tmp_path)
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    labels[0].unlink()                                                        # no label file: background
    labels[1].write_text("0 0.5 0.5 1.6 0.4\n1 0.5 0.5 0 0.2\n\n")           # past the edge: clipped; zero: dropped
    (root / "images" / "train" / "broken.jpg").write_bytes(b"not an image")
    report = LoadReport()
    records, _ = open_data(str(root / "data.yaml")).load("train", report=report)
    assert len(records) == 6 and report.corrupt_images == [str(root / "images" / "train" / "broken.jpg")]
    assert report.missing_labels == 1 and report.degenerate_boxes == 1
    assert len(records[0].boxes) == 0
    (box,) = records[1].boxes
    assert box[0] == 0 and box[2] == records[1].width and box[3] - box[1] == pytest.approx(0.4 * records[1].height)
    err = capsys.readouterr().err
    assert "1 images of" in err and "have no label file" in err and "skipped 1 unreadable" in err


def test_yolo_list_files_and_dict_or_list_names(sets, tmp_path):
    root = _yolo_copy(sets, tmp_path)
    images = sorted((root / "images" / "val").glob("*.jpg"))
    (root / "val.txt").write_text("".join(f"./images/val/{p.name}\n" for p in images[:2]))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: val.txt\n"
                                    f"names: [{', '.join(SAMPLE_CLASSES)}]\n")
    source = open_data(str(root / "data.yaml"))
    records, names = source.load("val")
    assert names == SAMPLE_CLASSES and [Path(r.image_path).name for r in records] == [p.name for p in images[:2]]
    assert not source.has_split("test")
    with pytest.raises(DatasetError, match="split test not found .* existing splits: train, val"):
        source.load("test")
    records, _ = source.load("test", fallback="val")          # get_map's default falls back, as VOC's does
    assert len(records) == 2
    # Roboflow's export: '../train/images' written beside the data.yaml, no path:
    (root / "data.yaml").write_text("train: ../images/train\nval: ../images/val\nnames: [a, b, c, d]\n")
    assert len(open_data(str(root)).load("train")[0]) == 6


@pytest.mark.parametrize("text, words", [
    ("0 0.5 0.5 0.2\n", ["line 1", "5 values"]),
    ("0 0.5 0.5 0.2 0.2\n1 0.5 x 0.2 0.2\n", ["line 2", "'x' is not a number"]),
    ("4 0.5 0.5 0.2 0.2\n", ["line 1", "class 4", "0..3"]),
])
def test_malformed_yolo_label_names_file_and_line(sets, tmp_path, text, words):
    root = _yolo_copy(sets, tmp_path)
    label = sorted((root / "labels" / "train").glob("*.txt"))[2]
    label.write_text(text)
    with pytest.raises(DatasetError) as info:
        open_data(str(root / "data.yaml")).load("train")
    message = str(info.value)
    assert "\n" not in message and str(label) in message and all(w in message for w in words), message


def test_malformed_data_yaml_names_file_and_line(tmp_path):
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [a, b\n")
    with pytest.raises(DatasetError, match=r"malformed data file .*data.yaml line \d"):
        open_data(str(tmp_path / "data.yaml"))
    (tmp_path / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(DatasetError, match="needs 'names'"):
        open_data(str(tmp_path / "data.yaml"))
    (tmp_path / "data.yaml").write_text("train: images/nowhere\nnames: {0: a}\n")
    with pytest.raises(DatasetError, match="'images/nowhere' is neither a folder nor a list file"):
        open_data(str(tmp_path / "data.yaml")).load("train")


def test_coco_messy_and_malformed(sets, tmp_path, capsys):
    data = tmp_path / "coco"
    shutil.copytree(sets["coco"], data)
    path = data / "annotations" / "instances_train.json"
    raw = json.loads(path.read_text())
    raw["annotations"].append(dict(raw["annotations"][0], id=999, image_id=12345))      # an image not listed
    raw["annotations"].append(dict(raw["annotations"][0], id=1000, bbox=[-5, -5, 3, 3]))  # clipped to nothing
    (data / "train" / raw["images"][3]["file_name"]).unlink()
    path.write_text(json.dumps(raw))
    report = LoadReport()
    records, _ = open_data(str(data)).load("train", report=report)
    assert len(records) == 5 and report.orphan_annotations == 1 and report.degenerate_boxes == 1
    assert report.missing_files == [str(data / "train" / raw["images"][3]["file_name"])]
    assert "whose image_id is not among its images" in capsys.readouterr().err

    path.write_text(json.dumps(raw, indent=1)[:-40])
    with pytest.raises(DatasetError, match=r"malformed COCO file .*instances_train.json line \d+ column \d+"):
        open_data(str(data)).load("train")
    raw["annotations"][3]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match=r"instances_train.json: annotation 3 \(id 4\) needs a 'bbox' of 4"):
        open_data(str(data)).load("train")


def test_coco_split_names_answer_to_ours(sets, tmp_path):
    data = tmp_path / "coco"
    shutil.copytree(sets["coco"], data)
    for split, theirs in (("train", "train2017"), ("val", "valid")):
        (data / "annotations" / f"instances_{split}.json").rename(data / "annotations" / f"instances_{theirs}.json")
        (data / split).rename(data / theirs)
    source = open_data(str(data))
    assert source.has_split("train") and source.has_split("val")
    report = LoadReport()
    records, _ = source.load("train", report=report)
    assert report.split == "train2017" and len(records) == 6
    assert len(source.load("val")[0]) == 3


def test_a_malformed_label_stops_train_py_with_one_line_before_any_folder(sets, tmp_path, capsys):
    from utils.cli import run_cli
    root = _yolo_copy(sets, tmp_path)
    label = sorted((root / "labels" / "val").glob("*.txt"))[0]
    label.write_text("0 0.5 0.5 0.2 0.2 0.9\n")                    # a --save-conf line is not a training label
    with pytest.raises(SystemExit) as info:
        run_cli(train.main, ["--data", str(root / "data.yaml"), "--save-dir", str(tmp_path / "logs"), *TINY])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and not (tmp_path / "logs").exists()
    assert err.startswith(f"error: malformed label {label} line 1: expected 'class cx cy w h' (5 values)"), err

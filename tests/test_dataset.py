"""utils/data/voc.py and dataset.py: VOC parsing on small datasets written into tmp_path."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.data.dataset import DatasetError, ImageReadError, LoadReport, load_image, read_class_names
from utils.data.voc import load_voc, resolve_split


def voc_xml(objects=(), filename="x.jpg", size=(100, 100), difficult_tag=True) -> str:
    """A VOC annotation; objects are (name, (xmin, ymin, xmax, ymax), difficult)."""
    objs = []
    for name, box, diff in objects:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        flag = f"<difficult>{diff}</difficult>" if difficult_tag else ""
        objs.append(f"<object><name>{name}</name><pose>Unspecified</pose>{flag}<bndbox>{coords}</bndbox></object>")
    w, h = size
    return (f"<annotation><folder>VOC</folder><filename>{filename}</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{''.join(objs)}</annotation>")


def image(h: int, w: int, value: int = 128) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def make_voc(root: Path, items: dict, split: str = "train", classes: list[str] | None = None) -> Path:
    """Write a VOC folder; items map id -> (xml text or None, {image file name: ndarray or bytes})."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (xml, files) in items.items():
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        for name, data in files.items():
            if isinstance(data, bytes):
                (root / "JPEGImages" / name).write_bytes(data)
            else:
                ok, buf = cv2.imencode(Path(name).suffix, data)
                assert ok
                (root / "JPEGImages" / name).write_bytes(buf.tobytes())
    if split:
        (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def one(tmp_path: Path, objects, size=(100, 100), img_hw=(100, 100), **kw):
    """Load a one-image dataset; returns (record, class names, report)."""
    root = make_voc(tmp_path / "VOC", {"a": (voc_xml(objects, "a.jpg", size), {"a.jpg": image(*img_hw)})})
    report = LoadReport()
    records, names = load_voc(root, "train", report=report, **kw)
    assert len(records) == 1
    return records[0], names, report


def test_basic_record_types_and_values(tmp_path):
    rec, names, report = one(tmp_path, [("dog", (10, 20, 30.0, 40), 0), ("cat", ("5.5", 6, 50, 60), 1)])
    assert names == ["cat", "dog"]
    assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (2, 4)
    assert rec.labels.dtype == np.int64 and rec.labels.tolist() == [1, 0]
    assert rec.difficult.dtype == bool and rec.difficult.tolist() == [False, True]
    np.testing.assert_array_equal(rec.boxes, [[10, 20, 30, 40], [5.5, 6, 50, 60]])
    assert (rec.height, rec.width, rec.image_id) == (100, 100, "a")
    assert Path(rec.image_path).name == "a.jpg"
    assert report.num_ids == report.num_records == 1


def test_size_comes_from_image_not_xml(tmp_path):
    rec, _, _ = one(tmp_path, [("dog", (1, 2, 30, 20), 0)], size=(640, 480), img_hw=(24, 48))
    assert (rec.height, rec.width) == (24, 48)


def test_box_outside_image_is_clipped(tmp_path):
    rec, _, report = one(tmp_path, [("dog", (-5, -3.5, 130, 70), 0)], img_hw=(50, 80))
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 80, 50]])
    assert report.degenerate_boxes == 0


def test_degenerate_boxes_dropped_and_counted(tmp_path, capsys):
    objects = [
        ("dog", (10, 10, 10.5, 30), 0),  # 0.5 px wide
        ("dog", (30, 30, 20, 40), 0),  # xmax < xmin
        ("dog", (95, 10, 120, 20), 0),  # 0 px wide once clipped to the 95 px wide image
        ("cat", (1, 1, 2, 2), 1),  # exactly 1 px: kept
    ]
    rec, names, report = one(tmp_path, objects, img_hw=(100, 95))
    assert report.degenerate_boxes == 3
    assert rec.labels.tolist() == [names.index("cat")]
    assert rec.difficult.tolist() == [True]
    np.testing.assert_array_equal(rec.boxes, [[1, 1, 2, 2]])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "dropped 3 boxes" in err[0]


def test_difficult_missing_means_false(tmp_path):
    root = make_voc(tmp_path / "VOC", {"a": (voc_xml([("dog", (1, 1, 9, 9), 1)], difficult_tag=False),
                                             {"a.jpg": image(10, 10)})})
    (rec,), _ = load_voc(root, "train")
    assert rec.difficult.tolist() == [False] and rec.difficult.dtype == bool


def test_image_without_objects_kept_with_empty_arrays(tmp_path):
    root = make_voc(tmp_path / "VOC", {
        "a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"a.jpg": image(10, 10)}),
        "b": (voc_xml([]), {"b.jpg": image(12, 14)}),
    })
    records, _ = load_voc(root, "train")
    b = records[1]
    assert b.image_id == "b" and (b.height, b.width) == (12, 14)
    assert b.boxes.shape == (0, 4) and b.boxes.dtype == np.float32
    assert b.labels.shape == (0,) and b.labels.dtype == np.int64
    assert b.difficult.shape == (0,) and b.difficult.dtype == bool


def test_png_bytes_in_jpg_file(tmp_path):
    png = cv2.imencode(".png", image(30, 40, 200))[1].tobytes()
    root = make_voc(tmp_path / "VOC", {"a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"a.jpg": png})})
    (rec,), _ = load_voc(root, "train")
    assert (rec.height, rec.width) == (30, 40)
    img = load_image(rec.image_path)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8 and int(img[0, 0, 0]) == 200


def test_image_found_by_filename_or_by_id_with_any_extension(tmp_path):
    root = make_voc(tmp_path / "VOC", {
        "a": (voc_xml([], filename="photo_a.bmp"), {"photo_a.bmp": image(10, 11)}),  # only <filename> fits
        "b": (voc_xml([], filename="stale.jpg"), {"b.png": image(12, 13)}),  # id + .png
        "c": (voc_xml([], filename="c"), {"c.JPEG": image(14, 15)}),  # no extension; upper case
        "d": (voc_xml([], filename="photo_a.bmp"), {"d.jpg": image(16, 17)}),  # copy-pasted XML: the id wins
    })
    records, _ = load_voc(root, "train", class_names=["dog"])
    assert [Path(r.image_path).name for r in records] == ["photo_a.bmp", "b.png", "c.JPEG", "d.jpg"]
    assert [(r.height, r.width) for r in records] == [(10, 11), (12, 13), (14, 15), (16, 17)]


def test_unknown_classes_skipped_counted_one_warning(tmp_path, capsys):
    objects = [("dog", (1, 1, 9, 9), 0), ("cat", (1, 1, 9, 9), 0), ("cow", (2, 2, 8, 8), 0), ("cat", (3, 3, 9, 9), 0)]
    root = make_voc(tmp_path / "VOC", {
        "a": (voc_xml(objects), {"a.jpg": image(10, 10)}),
        "b": (voc_xml([("cat", (1, 1, 5, 5), 0)]), {"b.jpg": image(10, 10)}),
    }, classes=["dog"])
    report = LoadReport()
    records, names = load_voc(root, "train", report=report)
    assert names == ["dog"]
    assert [r.labels.tolist() for r in records] == [[0], []]
    assert report.unknown == {"cat": 3, "cow": 1}
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: skipped 4 objects of 2 unknown classes in {root} (cat: 3, cow: 1); "
                   f"pass --classes to include them"]


def test_missing_and_corrupt_images_skipped_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = make_voc(tmp_path / "VOC", {
        "ok": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"ok.jpg": image(10, 10)}),
        "gone1": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {}),
        "gone2": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {}),
        "bad": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"bad.jpg": rng.integers(0, 256, 500, np.uint8).tobytes()}),
        "empty": (voc_xml([]), {"empty.png": b""}),
    })
    report = LoadReport()
    records, _ = load_voc(root, "train", report=report)
    assert [r.image_id for r in records] == ["ok"]
    assert report.missing_images == ["gone1", "gone2"]
    assert [Path(p).name for p in report.corrupt_images] == ["bad.jpg", "empty.png"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "skipped 2 ids with no image" in err[0] and "gone1" in err[0]
    assert "skipped 2 unreadable or corrupt images" in err[1] and "bad.jpg" in err[1]


def test_no_readable_image_is_an_error(tmp_path):
    root = make_voc(tmp_path / "VOC", {"a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {})})
    with pytest.raises(DatasetError, match="no readable images"):
        load_voc(root, "train")


def test_malformed_xml_names_the_file(tmp_path):
    root = make_voc(tmp_path / "VOC", {
        "a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"a.jpg": image(10, 10)}),
        "broken_007": ("<annotation><object><name>dog</name>", {"broken_007.jpg": image(10, 10)}),
    })
    with pytest.raises(DatasetError, match="broken_007.xml") as e:
        load_voc(root, "train")
    assert "\n" not in str(e.value)


def test_non_numeric_coordinate_names_the_file(tmp_path):
    items = {"bad_box": (voc_xml([("dog", (1, "abc", 9, 9), 0)]), {"bad_box.jpg": image(10, 10)})}
    root = make_voc(tmp_path / "VOC", items)
    with pytest.raises(DatasetError, match="bad_box.xml"):
        load_voc(root, "train")


def test_missing_xml_names_the_file(tmp_path):
    root = make_voc(tmp_path / "VOC", {
        "a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"a.jpg": image(10, 10)}),
        "no_xml": (None, {"no_xml.jpg": image(10, 10)}),
    })
    with pytest.raises(DatasetError, match="no_xml.xml"):
        load_voc(root, "train")


def test_empty_split_names_the_split_file(tmp_path):
    root = make_voc(tmp_path / "VOC", {})
    (root / "ImageSets/Main/train.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match=r"train\.txt is empty"):
        load_voc(root, "train")


def test_split_fallback(tmp_path):
    root = make_voc(tmp_path / "VOC", {"a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"a.jpg": image(10, 10)})},
                    split="trainval")
    assert resolve_split(root, "train", "trainval") == ("trainval", root / "ImageSets/Main/trainval.txt")
    report = LoadReport()
    records, _ = load_voc(root, "train", fallback="trainval", report=report)
    assert len(records) == 1 and report.split == "trainval"


def test_repeated_ids_loaded_once(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC", {"a": (voc_xml([("dog", (1, 1, 9, 9), 0)]), {"a.jpg": image(10, 10)})})
    (root / "ImageSets/Main/train.txt").write_text("a\n a \n\na\n")
    report = LoadReport()
    records, _ = load_voc(root, "train", report=report)
    assert [r.image_id for r in records] == ["a"] and report.duplicate_ids == 2
    assert "ignored 2 repeated ids" in capsys.readouterr().err


def test_missing_split_lists_existing_splits(tmp_path):
    root = make_voc(tmp_path / "VOC", {}, split="")
    for name in ("trainval", "test", "dog_train"):
        (root / "ImageSets/Main" / f"{name}.txt").write_text("a\n")
    with pytest.raises(DatasetError) as e:
        resolve_split(root, "val", "mini")
    msg = str(e.value)
    assert "val.txt or mini.txt" in msg and msg.endswith("existing splits: test, trainval, dog_train")


def test_bad_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_voc(tmp_path / "nope", "train")
    make_voc(tmp_path / "VOCdevkit" / "VOC2007", {})
    with pytest.raises(DatasetError, match=r"no Annotations/ folder.*VOC2007"):
        load_voc(tmp_path / "VOCdevkit", "train")


def test_class_names_sources(tmp_path):
    items = {"a": (voc_xml([("zebra", (1, 1, 9, 9), 0), ("ant", (1, 1, 9, 9), 0)]), {"a.jpg": image(10, 10)})}
    root = make_voc(tmp_path / "VOC", items)
    records, names = load_voc(root, "train")  # sorted names found
    assert names == ["ant", "zebra"] and records[0].labels.tolist() == [1, 0]
    (root / "classes.txt").write_text("  zebra \n\nbee\nant\n")  # classes.txt beside the data
    records, names = load_voc(root, "train")
    assert names == ["zebra", "bee", "ant"] and records[0].labels.tolist() == [0, 2]
    records, names = load_voc(root, "train", class_names=["ant", "zebra", "x"])  # the argument wins
    assert names == ["ant", "zebra", "x"] and records[0].labels.tolist() == [1, 0]


def test_read_class_names(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\ufeffperson \n\n  car\n")
    assert read_class_names(f) == ["person", "car"]
    f.write_text("\n \n")
    with pytest.raises(DatasetError, match="c.txt"):
        read_class_names(f)
    f.write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match=r"c\.txt: a;"):
        read_class_names(f)
    with pytest.raises(DatasetError, match="missing.txt"):
        read_class_names(tmp_path / "missing.txt")


def test_load_image_grayscale_and_alpha_become_bgr(tmp_path):
    gray = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    img = load_image(tmp_path / "g.png")
    assert img.shape == (6, 7, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], gray)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.zeros((5, 4, 4), np.uint8))
    assert load_image(tmp_path / "rgba.png").shape == (5, 4, 3)


def test_load_image_non_ascii_path_and_exif_ignored(tmp_path):
    path = tmp_path / "bild_ä_图.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    # Same orientation as the header size load_voc records, so the boxes stay valid.
    assert load_image(path).shape == (20, 40, 3)


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(ImageReadError, match="gone.jpg"):
        load_image(tmp_path / "gone.jpg")
    assert issubclass(ImageReadError, DatasetError)

"""Tests for the built-in sample dataset generator (utils/data/sample_data.py)."""
import hashlib
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.data import sample_data
from utils.data.sample_data import MAX_OBJECTS, SAMPLE_CLASSES, ensure_sample_dataset, make_sample_dataset, render_sample

SMALL = dict(n_train=5, n_val=2, n_test=2, size=(64, 64), seed=0)


def _hashes(root: Path) -> dict:
    """Relative path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _split(root: Path, name: str) -> list:
    """Ids listed in ImageSets/Main/<name>.txt."""
    return (root / "ImageSets" / "Main" / f"{name}.txt").read_text().split()


def _read_xml(path: Path):
    """(filename, (h, w, depth), [(name, difficult, [x1, y1, x2, y2])]) from a VOC annotation."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    hwd = tuple(int(size.find(k).text) for k in ("height", "width", "depth"))
    objs = [(o.find("name").text, int(o.find("difficult").text),
             [int(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
            for o in root.findall("object")]
    return root.find("filename").text, hwd, objs


def test_generation_is_byte_identical(tmp_path):
    a = _hashes(make_sample_dataset(tmp_path / "a", **SMALL))
    b = _hashes(make_sample_dataset(tmp_path / "b", **SMALL))
    assert a == b
    assert len([k for k in a if k.startswith("JPEGImages/")]) == 9
    c = _hashes(make_sample_dataset(tmp_path / "c", **{**SMALL, "seed": 1}))
    assert a["JPEGImages/sample_000000.jpg"] != c["JPEGImages/sample_000000.jpg"]


def test_counts_do_not_change_earlier_images(tmp_path):
    small = _hashes(make_sample_dataset(tmp_path / "a", **{**SMALL, "n_train": 3, "n_val": 0, "n_test": 0}))
    big = _hashes(make_sample_dataset(tmp_path / "b", **SMALL))
    for i in range(3):
        for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "xml")):
            key = f"{sub}/sample_{i:06d}.{ext}"
            assert small[key] == big[key]


def test_layout(tmp_path):
    root = make_sample_dataset(tmp_path / "s", **SMALL)
    train, val, test, trainval = (_split(root, n) for n in ("train", "val", "test", "trainval"))
    assert (len(train), len(val), len(test)) == (5, 2, 2)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert trainval == train + val
    for image_id in train + val + test:
        assert image_id.startswith("sample_") and len(image_id) == len("sample_000000")
        assert (root / "Annotations" / f"{image_id}.xml").is_file()
        assert (root / "JPEGImages" / f"{image_id}.jpg").is_file()
    assert (root / "classes.txt").read_text().splitlines() == SAMPLE_CLASSES
    assert 3 <= len(SAMPLE_CLASSES) <= 4
    assert "generated" in (root / "README.txt").read_text().lower()
    assert (root / sample_data.MARKER).is_file()


def test_xml_matches_image_and_renderer(tmp_path):
    root = make_sample_dataset(tmp_path / "s", **{**SMALL, "size": (96, 96), "n_train": 12})
    n_objects = 0
    for i, image_id in enumerate(_split(root, "train") + _split(root, "val")):
        filename, (h, w, depth), objs = _read_xml(root / "Annotations" / f"{image_id}.xml")
        image = cv2.imread(str(root / "JPEGImages" / filename))
        assert filename == f"{image_id}.jpg" and image.shape == (h, w, depth) and depth == 3
        assert h == 96 and 80 <= w <= 112  # width jittered +-15 %
        ref, boxes, labels, _ = render_sample(i, (96, 96), seed=0)
        assert ref.shape == image.shape
        # the JPEG is that rendering: compare blurred, JPEG (quality 90) mostly alters fine detail
        assert np.abs(cv2.blur(ref, (5, 5)).astype(np.float32) - cv2.blur(image, (5, 5))).mean() < 4
        assert [o[0] for o in objs] == [SAMPLE_CLASSES[c] for c in labels]
        assert [o[2] for o in objs] == boxes.tolist()
        assert all(o[1] == 0 for o in objs)
        n_objects += len(objs)
    assert n_objects > 10


def test_boxes_are_tight_boxes_of_visible_shapes():
    size = (96, 128)
    checked, contrast = 0, []
    for i in range(40):
        img, boxes, labels, masks = render_sample(i, size, seed=3, vary_width=0)
        h, w = img.shape[:2]
        assert (h, w) == size and masks.shape == (len(boxes), h, w)
        assert boxes.dtype == np.int64 and labels.dtype == np.int64
        assert ((labels >= 0) & (labels < len(SAMPLE_CLASSES))).all()
        assert masks.sum(0).max(initial=0) <= 1  # visible parts never overlap
        for box, m in zip(boxes, masks):
            x1, y1, x2, y2 = box.tolist()
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            ys, xs = np.nonzero(m)
            assert [x1, y1, x2, y2] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # every border row/column of the box touches the shape: the box is tight
            assert m[y1, x1:x2].any() and m[y2 - 1, x1:x2].any() and m[y1:y2, x1].any() and m[y1:y2, x2 - 1].any()
            assert not m[:y1].any() and not m[y2:].any() and not m[:, :x1].any() and not m[:, x2:].any()
            # the shape stands out from the background inside its own box (corners of circles/triangles/stars)
            bg = ~masks.any(0)[y1:y2, x1:x2]
            if bg.sum() >= 10:
                crop = img[y1:y2, x1:x2].astype(np.float32)
                contrast.append(np.linalg.norm(crop[m[y1:y2, x1:x2]].mean(0) - crop[bg].mean(0)))
            checked += 1
    assert checked > 60
    assert np.median(contrast) > 60 and np.mean(np.array(contrast) > 25) > 0.9


def test_statistics_cover_the_spec():
    counts, sizes, classes = [], [], []
    for i in range(150):
        _, boxes, labels, _ = render_sample(i, (64, 64), seed=0, vary_width=0)
        counts.append(len(boxes))
        classes += labels.tolist()
        sizes += (np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 64).tolist()
    counts = np.array(counts)
    assert counts.max() <= MAX_OBJECTS and 0 < (counts == 0).sum() < 30 and (counts >= 3).sum() > 60
    assert np.bincount(classes, minlength=len(SAMPLE_CLASSES)).min() > 40
    assert min(sizes) < 0.15 and max(sizes) > 0.3 and max(sizes) <= 0.45


def test_ensure_generates_once_and_regenerates_on_change(tmp_path, monkeypatch):
    root = tmp_path / "VOCdevkit" / "sample"
    assert ensure_sample_dataset(root, **SMALL) == root
    marker = root / sample_data.MARKER
    stamp = marker.stat().st_mtime_ns
    first = _hashes(root)

    def boom(*a, **k):
        raise AssertionError("regenerated although the marker matches")

    with monkeypatch.context() as m:
        m.setattr(sample_data, "make_sample_dataset", boom)
        ensure_sample_dataset(root, **SMALL)
    assert marker.stat().st_mtime_ns == stamp and _hashes(root) == first

    ensure_sample_dataset(root, **{**SMALL, "n_train": 3})
    assert len(_split(root, "train")) == 3
    assert not (root / "JPEGImages" / "sample_000008.jpg").exists()  # stale copy replaced, not merged
    assert sorted(os.listdir(root.parent)) == ["sample"]  # no temp folders left behind


def test_ensure_interrupted_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "sample"
    calls = []

    def failing_render(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return render_sample(*a, **k)

    monkeypatch.setattr(sample_data, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_sample_dataset(root, **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    ensure_sample_dataset(root, **SMALL)
    assert len(list((root / "JPEGImages").iterdir())) == 9


def test_ensure_refuses_foreign_folder_and_bad_args(tmp_path):
    foreign = tmp_path / "VOC2007"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        ensure_sample_dataset(foreign, **SMALL)
    assert (foreign / "keep.txt").read_text() == "user data"
    with pytest.raises(TypeError, match="n_train"):
        ensure_sample_dataset(tmp_path / "x", n_trian=3)

"""Hostile data (issue 12, data side): split typos, XML <size> vs the image, empty splits, no val split,
images over the pixel limit. Each test builds its bad files in tmp_path."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import train
import utils.data.dataset as dataset
from utils.cli import run_cli
from utils.config import DataConfig
from utils.data.dataset import DatasetError, ImageReadError, LoadReport, load_image
from utils.data.voc import load_voc
from utils.data.sample_data import make_sample_dataset
from utils.engine.train_data import carve_validation, load_splits

TINY = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--epochs", "1"]


def sample(tmp_path: Path, n_train: int = 4) -> Path:
    return make_sample_dataset(tmp_path / "voc", n_train=n_train, n_val=2, n_test=2, size=(64, 64))


def split_ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/Main" / f"{split}.txt").read_text().split()


def empty_annotations(root: Path, ids: list[str]) -> None:
    """Rewrite the ids' XMLs without any <object>."""
    for i in ids:
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename><size><width>64</width><height>64</height></size></annotation>")


def one_image(tmp_path: Path, xml_size: tuple[int, int], box: tuple, img_wh: tuple[int, int] = (64, 64)) -> Path:
    """A one-image VOC folder (split train, class dog) with the given <size> and box."""
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    (root / "Annotations/a.xml").write_text(
        f"<annotation><filename>a.jpg</filename><size><width>{xml_size[0]}</width><height>{xml_size[1]}</height>"
        f"</size><object><name>dog</name><bndbox>{coords}</bndbox></object></annotation>")
    cv2.imwrite(str(root / "JPEGImages/a.jpg"), np.full((img_wh[1], img_wh[0], 3), 128, np.uint8))
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    return root


def test_split_typos_are_errors_listing_the_splits(tmp_path, capsys):
    root = sample(tmp_path)
    with pytest.raises(DatasetError, match=r"vall\.txt not found.*existing splits: test, train, trainval, val$"):
        load_splits(DataConfig(data=str(root), val_split="vall"))
    with pytest.raises(DatasetError, match=r"trian\.txt not found"):
        load_splits(DataConfig(data=str(root), train_split="trian"))
    # get_map.py's call: only the default name test falls back (to val), with a warning naming both
    with pytest.raises(DatasetError, match=r"nosuch\.txt not found in .*existing splits"):
        load_voc(root, "nosuch", fallback="val" if "nosuch" == "test" else None)
    (root / "ImageSets/Main/test.txt").unlink()
    report = LoadReport()
    load_voc(root, "test", fallback=dataset.default_fallback("test"), report=report)
    assert report.split == "val" and report.fallback_from == "test"
    assert "no split test.txt" in capsys.readouterr().err
    # through train.py: one line, exit 2, no run folder
    argv = ["--data", str(root), "--val-split", "vall", "--save-dir", str(tmp_path / "logs"), *TINY]
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "vall.txt" in err[0]
    assert not (tmp_path / "logs").exists()


def test_xml_size_at_another_scale_rescales_else_clips(tmp_path, capsys):
    # labelled on 128x128, image file shrunk to 64x64: boxes halve, one counted warning
    report = LoadReport()
    (rec,), _ = load_voc(one_image(tmp_path / "a", (128, 128), (20, 40, 120, 126)), "train", report=report)
    np.testing.assert_allclose(rec.boxes, [[10, 20, 60, 63]])
    assert report.rescaled_images == 1 and report.size_mismatches == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "rescaled the boxes of 1 images" in err[0]
    # <size> of another aspect ratio: today's rule (file size, clip), counted apart, not a warning
    report = LoadReport()
    (rec,), _ = load_voc(one_image(tmp_path / "b", (128, 64), (20, 10, 120, 60)), "train", report=report)
    np.testing.assert_allclose(rec.boxes, [[20, 10, 64, 60]])
    assert report.rescaled_images == 0 and report.size_mismatches == 1
    out = capsys.readouterr()
    assert out.err == "" and "1 annotations in" in out.out and "clipped" in out.out


def test_empty_validation_split_warns_and_empty_training_split_is_an_error(tmp_path, capsys):
    root = sample(tmp_path)
    empty_annotations(root, split_ids(root, "val"))
    splits = load_splits(DataConfig(data=str(root)))
    assert splits.val_source == "val" and len(splits.val) == 2
    assert "the validation split val has no objects" in capsys.readouterr().err
    empty_annotations(root, split_ids(root, "train"))
    with pytest.raises(DatasetError, match=r"no objects in any of the 4 training images of .*train\.txt"):
        load_splits(DataConfig(data=str(root)))


def test_without_validation_objects_best_pt_follows_the_last_epoch(tmp_path):
    root = sample(tmp_path)
    empty_annotations(root, split_ids(root, "val"))
    out = train.main(["--data", str(root), "--save-dir", str(tmp_path / "logs"), "--name", "e", *TINY[:-2],
                      "--epochs", "2"])
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 2


def test_no_val_split_holds_out_a_fixed_share_of_train(tmp_path, capsys):
    root = sample(tmp_path, n_train=8)
    train_ids = split_ids(root, "train")
    (root / "ImageSets/Main/val.txt").unlink()
    splits = load_splits(DataConfig(data=str(root)))
    assert splits.val_source == "10% of train (1 images)" and len(splits.val) == 1 and len(splits.train) == 7
    held = splits.val[0].image_id
    assert held in train_ids and held not in {r.image_id for r in splits.train}
    # the same image whatever the split file's order and --seed: a study validates on one set
    (root / "ImageSets/Main/train.txt").write_text("".join(f"{i}\n" for i in reversed(train_ids)))
    assert [r.image_id for r in load_splits(DataConfig(data=str(root))).val] == [held]
    assert len(carve_validation(splits.train + splits.val, 0.5)[1]) == 4
    # test only when asked for by name; a default name that is missing still falls back, with a warning
    assert load_splits(DataConfig(data=str(root), val_split="test")).val_source == "test"
    capsys.readouterr()
    assert load_splits(DataConfig(data=str(root), val_split="val")).val_source == "test (no val split)"
    assert "best.pt is chosen on it" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"no val split .*--val-fraction is 0; pass --val-split"):
        load_splits(DataConfig(data=str(root), val_fraction=0.0))
    # validating on images that are also trained on is said
    (root / "ImageSets/Main/val.txt").write_text(f"{train_ids[0]}\n")
    load_splits(DataConfig(data=str(root)))
    assert "1 of the 1 validation images (val) are also in the training split" in capsys.readouterr().err
    (root / "ImageSets/Main/val.txt").unlink()
    # train.py's start-up table names the validation actually used; the checkpoint keeps "not given"
    folder = train.main(["--data", str(root), "--save-dir", str(tmp_path / "logs"), *TINY])
    out = capsys.readouterr().out
    assert any(line.split()[:1] == ["validation"] and "10% of train (1 images)" in line for line in out.splitlines())
    import torch
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    assert ckpt["train_args"]["val_split"] is None and ckpt["train_args"]["val_fraction"] == 0.1


def test_image_over_the_pixel_limit_is_named_not_called_corrupt(tmp_path, monkeypatch, capsys):
    root = one_image(tmp_path, (64, 64), (1, 1, 30, 30), img_wh=(64, 48))
    # PIL's decompression-bomb limit (182-megapixel photos) does not stop the header read
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    report = LoadReport()
    (rec,), _ = load_voc(root, "train", report=report)
    assert (rec.width, rec.height) == (64, 48) and report.corrupt_images == [] and Image.MAX_IMAGE_PIXELS == 1000
    # over our own limit (OpenCV's): skipped, counted, named with its size and what to do
    monkeypatch.setattr(dataset, "MAX_IMAGE_PIXELS", 1000)
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    report = LoadReport()
    with pytest.raises(DatasetError, match="no readable images"):
        load_voc(root, "train", report=report)
    assert report.large_images == [(str(root / "JPEGImages/a.jpg"), 64, 48)] and report.corrupt_images == []
    err = capsys.readouterr().err
    assert "skipped 1 images over the 0-megapixel limit" in err and "a.jpg, 64x48" in err and "resize" in err
    # a file OpenCV refuses whose header is over the limit is called too large, not corrupt
    big = tmp_path / "big.png"
    ok, buf = cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))
    big.write_bytes(buf.tobytes()[:60])          # header intact, pixels cut off
    with pytest.raises(ImageReadError, match=r"big\.png is 64x48 .*over the .*-megapixel limit; resize it"):
        load_image(big)

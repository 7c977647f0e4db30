"""Hostile input and faults on the prediction / evaluation side: names from data stay inside --out, every failed
write is a one-line error, numeric flags are range-checked first, colliding stems, broken videos, odd arrays."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import get_map
import predict
import train
from utils.cli import run_cli
from utils.data.sample_data import make_sample_dataset
from utils.engine.checkpoint import save_checkpoint
from utils.engine.folders import inside, safe_component
from utils.engine.predict_io import class_counts, class_folders
from yolo import YOLO


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))


@pytest.fixture(scope="module")
def weights(data, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    run = train.main(["--data", str(data), "--epochs", "1", "--img", "64", "--batch", "4", "--workers", "0",
                      "--device", "cpu", "--save-dir", str(logs), "--name", "r"])
    return run / "best.pt"


@pytest.fixture(scope="module")
def images(data) -> Path:
    return data / "JPEGImages"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_class_counts_name_every_class_found_and_only_those():
    names = ["RBC", "WBC", "Platelets"]
    dets = np.array([[0, 0, 1, 1, 0.9, c] for c in (2, 0, 2, 2)], np.float32)
    assert class_counts(dets, names) == {"Platelets": 3, "RBC": 1}
    assert class_counts(dets[:0], names) == {}
    dets[1, 5], dets[2, 5] = -1, 7          # ids the names do not cover (malformed detections): under their number
    assert class_counts(dets, names) == {"Platelets": 2, "-1": 1, "7": 1}


def test_safe_component_and_inside(tmp_path):
    for hostile in ("../../evil", "/abs/path", "..", ".", "", "a\\b", "C:x", "nul", "x\x00y"):
        name = safe_component(hostile)
        assert name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
        assert inside(tmp_path, name).parent == tmp_path.resolve()
    assert safe_component("person-1_a.b") == "person-1_a.b"
    assert class_folders(["a/b", "a_b"]) == ["a_b", "a_b_1"]
    for escape in (("..", "x"), ("/etc",), ("a", "../../b")):
        with pytest.raises(ValueError, match="outside the output folder"):
            inside(tmp_path, *escape)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path, "link", "x")


def test_hostile_class_names_write_only_inside_out(weights, images, tmp_path):
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    absolute = str(tmp_path / "abs_evil")
    ckpt["config"]["class_names"] = ["../../evil", absolute, "..", "a/b"]
    hostile = tmp_path / "work" / "hostile.pt"
    save_checkpoint(ckpt, hostile)
    before = files_under(tmp_path)
    out = tmp_path / "work" / "deep" / "out"
    predict.main(["--weights", str(hostile), "--source", str(images), "--conf", "0.0", "--crop", "--save-txt",
                  "--save-json", "--out", str(out), "--device", "cpu"])
    new = files_under(tmp_path) - before
    assert new and all(p.resolve().is_relative_to(out.resolve()) for p in new), sorted(new)
    assert not (tmp_path / "work" / "evil").exists() and not Path(absolute).exists()
    folders = {p.name for p in (out / "crops").iterdir()}
    assert folders and folders <= set(class_folders(ckpt["config"]["class_names"]))
    assert ".._.._evil" in class_folders(ckpt["config"]["class_names"])
    # the JSON keeps the real names: it is data, not a path
    assert {d["class_name"] for d in json.loads((out / "predictions.json").read_text())} <= set(ckpt["config"]["class_names"])


def test_blocked_out_fails_before_any_work(weights, data, images, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    monkeypatch.setattr(get_map, "Evaluator", lambda *a, **k: pytest.fail("evaluated before --out was checked"))
    for out in (blocker, blocker / "sub"):
        err = one_line_error(capsys, predict.main, ["--weights", str(weights), "--source", str(images),
                                                    "--out", str(out), "--device", "cpu"])
        assert err.startswith(f"error: cannot write {out}:"), err
        err = one_line_error(capsys, get_map.main, ["--weights", str(weights), "--data", str(data),
                                                    "--out", str(out), "--device", "cpu"])
        assert err.startswith(f"error: cannot write {out}:"), err
    assert blocker.read_text() == "keep me" and files_under(tmp_path) == {blocker}


def test_failed_writes_are_one_line_errors(weights, data, images, tmp_path, capsys, monkeypatch):
    base = ["--weights", str(weights), "--device", "cpu"]
    # a full disk, on both paths: the host path encodes with OpenCV, --decode device with nvJPEG where the images
    # are; both then write the bytes with write_files
    real_open = os.open

    def no_space(path, flags, *a, **k):
        if str(path).endswith(".jpg"):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", no_space)
    for name, flags in (("predict", ["--mode", "predict"]), ("heatmap", ["--mode", "heatmap"]),
                        ("device", ["--decode", "device"])):
        out = tmp_path / name
        err = one_line_error(capsys, predict.main, [*base, "--source", str(images), *flags, "--out", str(out)])
        assert err.startswith(f"error: cannot write {out.resolve()}/") and err.endswith(
            ".jpg: No space left on device"), err
    monkeypatch.undo()
    # a symlink planted where a drawing goes is refused, not followed out of the folder (both paths)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"keep me")
    first = sorted(p for p in images.iterdir() if p.suffix == ".jpg")[0]
    for decode in ("opencv", "device"):
        out = tmp_path / f"planted_{decode}"
        out.mkdir()
        (out / f"{first.stem}.jpg").symlink_to(outside)
        err = one_line_error(capsys, predict.main, [*base, "--source", str(images), "--decode", decode, "--out", str(out)])
        # the host path finds the link when it resolves the name (inside), the device path when it opens the file
        assert err.startswith("error: ") and f"{out.resolve()}/{first.stem}.jpg" in err, err
        assert outside.read_bytes() == b"keep me"
    # a video writer that cannot open
    video = tmp_path / "clip.avi"
    write_video(video, 3)

    class ClosedWriter:
        def __init__(self, *a, **k): pass
        def isOpened(self): return False        # noqa: E301,E704
        def release(self): pass                 # noqa: E301,E704
    monkeypatch.setattr(cv2, "VideoWriter", ClosedWriter)
    err = one_line_error(capsys, predict.main, [*base, "--source", str(video), "--out", str(tmp_path / "vid")])
    assert "cannot write" in err and "clip.mp4" in err
    monkeypatch.undo()
    # write_text failing (full disk) in predictions.json, labels and get_map's JSON files
    real_write_text = Path.write_text

    def full_disk(self, *a, **k):
        if self.suffix in (".json", ".txt"):
            raise OSError(28, "No space left on device")
        return real_write_text(self, *a, **k)
    monkeypatch.setattr(Path, "write_text", full_disk)

    def no_space_for_labels(path, flags, *a, **k):          # labels are written a batch at a time by write_files
        if str(path).endswith(".txt"):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", no_space_for_labels)
    for flag, name in (("--save-json", "predictions.json"), ("--save-txt", ".txt")):
        err = one_line_error(capsys, predict.main, [*base, "--source", str(images), flag, "--out", str(tmp_path / "p")])
        assert err.startswith("error: cannot write ") and name in err and err.endswith("No space left on device")
    err = one_line_error(capsys, get_map.main, [*base, "--data", str(data), "--out", str(tmp_path / "m")])
    assert err == f"error: cannot write {tmp_path / 'm' / 'detections.json'}: No space left on device"


@pytest.mark.parametrize("script,argv,expected", [
    ("predict", ["--batch", "0"], "--batch 0: must be at least 1"),
    ("predict", ["--batch", "-1"], "--batch -1: must be at least 1"),
    ("predict", ["--fps-iters", "0", "--mode", "fps"], "--fps-iters 0: must be at least 1"),
    ("predict", ["--img", "0"], "--img 0: must be between 32 and 4096"),
    ("predict", ["--img", "-32"], "--img -32: must be between 32 and 4096"),
    ("predict", ["--img", "100"], "--img 100: must be a multiple of 32"),
    ("get_map", ["--batch", "0"], "--batch 0: must be at least 1"),
    ("get_map", ["--workers", "-1"], "--workers -1: must be at least 0"),
    ("get_map", ["--score-threshold", "2"], "--score-threshold 2.0: must be between 0.0 and 1.0"),
])
def test_numeric_flags_are_range_checked_before_any_folder(weights, images, tmp_path, capsys, monkeypatch,
                                                            script, argv, expected):
    monkeypatch.chdir(tmp_path)              # default img_out/ and map_out/ would land here
    main = {"predict": predict.main, "get_map": get_map.main}[script]
    extra = ["--source", str(images)] if script == "predict" else []
    err = one_line_error(capsys, main, ["--weights", str(weights), *extra, *argv])
    assert err == f"error: {expected}" or err.startswith(f"error: {expected}"), err
    assert not any(tmp_path.iterdir())


def test_same_stem_images_keep_distinct_outputs(weights, images, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    first, second = sorted(images.glob("*.jpg"))[:2]
    shutil.copy(first, src / "a.jpg")
    cv2.imwrite(str(src / "a.png"), cv2.imread(str(second)))
    out = predict.main(["--weights", str(weights), "--source", str(src), "--conf", "0.0", "--save-txt", "--crop",
                        "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert {p.name for p in out.glob("*.jpg")} == {"a.jpg", "a_png.jpg"}
    assert {p.name for p in (out / "labels").iterdir()} == {"a.txt", "a_png.txt"}
    rows = [line.split() for line in (out / "labels" / "a.txt").read_text().splitlines()]
    assert rows and all(len(r) == 5 and 0 <= float(r[1]) <= 1 for r in rows)    # plain YOLO labels, no score
    with pytest.raises(ValueError, match="--save-conf adds the score to the --save-txt labels"):
        predict.main(["--weights", str(weights), "--source", str(src / "a.jpg"), "--save-conf"])
    conf = predict.main(["--weights", str(weights), "--source", str(src / "a.jpg"), "--conf", "0.0", "--save-txt",
                         "--save-conf", "--out", str(tmp_path / "conf"), "--device", "cpu"])
    scored = [line.split() for line in (conf / "labels" / "a.txt").read_text().splitlines()]
    assert [r[:5] for r in scored] == rows and all(len(r) == 6 and 0 <= float(r[5]) <= 1 for r in scored)
    crops = {p.name.rsplit("_", 1)[0] for p in (out / "crops").rglob("*.jpg")}
    assert crops == {"a", "a_png"}
    drawn_a = cv2.imread(str(out / "a.jpg"))
    assert drawn_a.shape == cv2.imread(str(first)).shape


def write_video(path: Path, frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()


def test_truncated_video_warns_frames_read_vs_expected(weights, tmp_path, capsys):
    video = tmp_path / "broken.avi"
    write_video(video, 20)
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])       # cut mid-stream
    out = predict.main(["--weights", str(weights), "--source", str(video), "--out", str(tmp_path / "out"),
                        "--device", "cpu"])
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert str(video) in warning and " of 20 frames" in warning
    assert (out / "broken.mp4").stat().st_size > 0


def test_heatmap_skips_and_counts_bad_images(weights, images, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(images.glob("*.jpg"))[:2]:
        shutil.copy(p, src / p.name)
    (src / "0_bad.jpg").write_bytes(b"not an image")
    out = predict.main(["--weights", str(weights), "--source", str(src), "--mode", "heatmap",
                        "--out", str(tmp_path / "out"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert len(list(out.glob("*_heatmap.jpg"))) == 2 and "2 heatmap images" in captured.out
    assert "skipped 1 unreadable images" in captured.err and "0_bad.jpg" in captured.err


def test_predict_arrays_float_empty_and_odd_dtypes(weights, images):
    yolo = YOLO(weights, device="cpu", conf=0.0)
    image = cv2.imread(str(sorted(images.glob("*.jpg"))[0]))
    expected = yolo.predict(image)[0]
    assert len(expected) > 0
    np.testing.assert_allclose(yolo.predict(image.astype(np.float32) / 255)[0], expected, atol=1e-3)
    for bad, message in ((image.astype(np.float32), "must lie in 0..1"),
                         (np.full((8, 8, 3), np.nan, np.float32), "must lie in 0..1"),
                         (image.astype(np.int64), "dtype int64"),
                         (np.zeros((0, 0, 3), np.uint8), "empty image array"),
                         (np.zeros((4, 4, 3), np.float32)[:0], "empty image array"),
                         (np.zeros((4, 4, 5), np.uint8), "shape (4, 4, 5)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            yolo.predict(bad)
    assert yolo.predict(image[:, :, :1])[0].shape[1] == 6            # HxWx1 grey is read as grey

"""End to end on tiny generated data: train -> checkpoint -> resume -> get_map -> predict, and CLI errors."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch

import get_map
import predict
import train
from utils.cli import run_cli
from utils.data.voc import load_voc
from utils.engine.evaluate import Evaluator
from utils.data.sample_data import SAMPLE_CLASSES, make_sample_dataset
from yolo import YOLO

TRAIN_ARGS = ["--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu", "--seed", "1",
              "--eval-period", "1", "--phi", "ca"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=8, n_val=4, n_test=4, size=(64, 64))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    out = train.main(["--data", str(data), "--epochs", "2", "--save-dir", str(logs), "--name", "r", *TRAIN_ARGS])
    return out


def results_epochs(run_dir) -> list[int]:
    with open(run_dir / "results.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def test_training_writes_loadable_checkpoints(run):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["config"]["class_names"] == SAMPLE_CLASSES
        assert ckpt["config"]["attention"] == "ca" and ckpt["config"]["input_shape"] == [64, 64]
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["optimizer"] and last["raw_model"]
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert "optimizer" not in best
    assert results_epochs(run) == [1, 2]
    assert (run / "loss.png").stat().st_size > 0 and (run / "map.png").stat().st_size > 0


def test_resume_continues_at_epoch_3(run, tmp_path):
    # work on a copy so the other tests keep the 2-epoch run
    copy = tmp_path / "r"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = torch.load(copy / "last.pt", map_location="cpu", weights_only=True)
    out = train.main(["--resume", str(copy / "last.pt"), "--epochs", "3", "--device", "cpu", "--workers", "0"])
    assert out == copy.resolve()
    after = torch.load(copy / "last.pt", map_location="cpu", weights_only=True)
    assert after["epoch"] == 3 and results_epochs(copy) == [1, 2, 3]
    # the optimizer state was carried over: SGD momentum buffers exist for the resumed step count
    assert after["optimizer"]["state"] and before["optimizer"]["state"]
    with pytest.raises(ValueError, match="already finished 3 epochs"):
        train.main(["--resume", str(copy / "last.pt")])


def test_get_map_writes_recomputable_files(run, data, tmp_path):
    summary = get_map.main(["--weights", str(run / "best.pt"), "--data", str(data), "--split", "test",
                            "--out", str(tmp_path), "--device", "cpu"])
    gt = json.loads((tmp_path / "ground_truth.json").read_text())
    dets = json.loads((tmp_path / "detections.json").read_text())
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(gt["images"]) == 4 and [c["name"] for c in gt["categories"]] == SAMPLE_CLASSES
    assert all({"image_id", "category_id", "bbox", "score"} <= set(d) for d in dets)
    assert saved["map50"] == summary["map50"] and set(saved["per_class"]) == set(SAMPLE_CLASSES)
    for key in ("map50_voc", "map50", "map50_95"):
        assert saved[key] is None or 0.0 <= saved[key] <= 1.0


def test_predict_matches_the_evaluation_pass(run, data):
    records, _ = load_voc(data, "test", SAMPLE_CLASSES)
    yolo = YOLO(run / "best.pt", device="cpu", conf=0.001, nms_iou=0.5)
    evaluated, used = Evaluator(records, SAMPLE_CLASSES, batch_size=3).detect(yolo)
    predicted = yolo.predict([r.image_path for r in used])
    assert sum(len(d) for d in predicted) > 0
    for a, b in zip(evaluated, predicted):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    # drawing does not change detections
    image = cv2.imread(used[0].image_path)
    before = yolo.predict(image)[0]
    yolo.detect_image(image)
    np.testing.assert_array_equal(before, yolo.predict(image)[0])


def test_predict_cli_on_folder_and_video(run, data, tmp_path):
    out = predict.main(["--weights", str(run / "best.pt"), "--source", str(data / "JPEGImages"), "--conf", "0.01",
                        "--out", str(tmp_path / "imgs"), "--save-txt", "--save-json", "--device", "cpu"])
    assert len(list(out.glob("*.jpg"))) == 16 and len(list((out / "labels").glob("*.txt"))) == 16
    assert isinstance(json.loads((out / "predictions.json").read_text()), list)
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(7):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    out = predict.main(["--weights", str(run / "best.pt"), "--source", str(video), "--out", str(tmp_path / "vid"),
                        "--device", "cpu"])
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 7
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (64, 48)
    cap.release()


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(run, data, tmp_path, capsys, monkeypatch):
    weights = str(run / "best.pt")
    monkeypatch.chdir(tmp_path)          # default output folders (img_out/, map_out/, logs/) would land here
    assert "nothere.jpg" in one_line_error(capsys, predict.main, ["--weights", weights, "--source", "nothere.jpg"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert "bad.jpg" in one_line_error(capsys, predict.main, ["--weights", weights, "--source", str(bad)])
    fake_video = tmp_path / "fake.mp4"
    fake_video.write_bytes(b"\x00" * 100)
    assert "cannot open" in one_line_error(capsys, predict.main, ["--weights", weights, "--source", str(fake_video)])
    not_ckpt = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, not_ckpt)
    assert "not a checkpoint" in one_line_error(capsys, predict.main, ["--weights", str(not_ckpt), "--source", str(bad)])
    assert "multiple of 32" in one_line_error(capsys, train.main, ["--data", str(data), "--img", "100"])
    assert "unknown attention" in one_line_error(capsys, train.main, ["--data", str(data), "--phi", "foo"])
    assert "--data sample" in one_line_error(capsys, train.main, ["--data", str(tmp_path / "empty")])
    assert "not found" in one_line_error(capsys, get_map.main, ["--weights", str(tmp_path / "none.pt")])
    # a failed run creates no output folder
    assert not any((tmp_path / d).exists() for d in ("img_out", "map_out", "logs"))


def test_torchrun_two_cpu_processes_train_and_resume(data, tmp_path):
    """DistributedDataParallel over gloo: rank 0 alone writes the run; resume works under torchrun too."""
    import subprocess
    import sys

    def torchrun(*argv):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    out = torchrun("--data", str(data), "--epochs", "1", "--save-dir", str(tmp_path), "--name", "ddp",
                   "--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu")
    assert out.count("done: best fitness") == 1                    # printed by rank 0 only
    run = tmp_path / "ddp"
    assert results_epochs(run) == [1]
    torchrun("--resume", str(run / "last.pt"), "--epochs", "2", "--device", "cpu", "--workers", "0")
    assert results_epochs(run) == [1, 2]
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["train_args"]["batch"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_weights_initialise_matching_tensors_and_freeze_keeps_the_backbone(run, data, tmp_path, capsys):
    """--weights copies every tensor whose name and shape match (phi 0 from a CA run); --freeze-epochs
    keeps the backbone's weights as loaded while the rest trains."""
    out = train.main(["--data", str(data), "--epochs", "1", "--save-dir", str(tmp_path), "--name", "w",
                      "--weights", str(run / "best.pt"), "--freeze-epochs", "1",
                      *[a for a in TRAIN_ARGS if a not in ("--phi", "ca")], "--phi", "0"])
    source = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    trained = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["raw_model"]
    printed = capsys.readouterr().out
    assert f"initialised {len(trained)}/{len(trained)} tensors" in printed    # everything but the CA blocks
    assert torch.equal(trained["backbone.conv1.conv.weight"], source["backbone.conv1.conv.weight"])
    assert torch.equal(trained["backbone.resblock_body3.conv4.conv.weight"],
                       source["backbone.resblock_body3.conv4.conv.weight"])
    assert not torch.equal(trained["yolo_headP5.1.weight"], source["yolo_headP5.1.weight"])

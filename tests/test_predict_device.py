"""The tensor path of prediction: letterbox on tensors (same geometry as OpenCV's, pixels within a level),
JPEG batches decoded by torchvision with OpenCV fallbacks, and predict.py --decode device against --decode opencv.

On the CPU the device path decodes with libjpeg-turbo instead of nvJPEG; everything else is the same code."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import predict
import train
from utils.data.image_batches import ImageBatches, decode_chunk, file_bytes
from utils.data.sample_data import make_sample_dataset
from utils.ops.capture_guard import CaptureGuard
from utils.ops.images import letterbox
from utils.ops.plots import draw_detections
from utils.ops.tensor_letterbox import letterbox_tensors
from yolo import YOLO

SIZES = [(480, 640), (300, 200), (64, 96), (100, 100), (128, 256), (30, 50), (96, 96), (97, 95)]


def textured(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR image with edges and noise: resize kernels differ most on such content."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    return np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def rgb_tensor(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))


@pytest.mark.parametrize("shape", [(96, 96), (64, 128)])
def test_tensor_letterbox_has_opencvs_geometry_and_pixels(shape):
    images = [textured(h, w, i) for i, (h, w) in enumerate(SIZES)]
    batch, metas = letterbox_tensors([rgb_tensor(im) for im in images], shape)
    assert batch.shape == (len(images), 3, *shape) and batch.dtype == torch.uint8
    for image, out, meta in zip(images, batch, metas):
        ref, ratio, (px, py) = letterbox(image, shape)
        assert tuple(meta) == (ratio, ratio, px, py, image.shape[1], image.shape[0])      # exactly
        diff = np.abs(out.numpy().transpose(1, 2, 0)[:, :, ::-1].astype(int) - ref.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.2, (image.shape, diff.max(), diff.mean())


def test_tensor_stretch_matches_opencv_linear():
    images = [textured(h, w, i) for i, (h, w) in enumerate(SIZES[:4])]
    batch, metas = letterbox_tensors([rgb_tensor(im) for im in images], (96, 96), letterbox=False)
    for image, out, meta in zip(images, batch, metas):
        ref = cv2.resize(image, (96, 96), interpolation=cv2.INTER_LINEAR)
        diff = np.abs(out.numpy().transpose(1, 2, 0)[:, :, ::-1].astype(int) - ref.astype(int))
        assert diff.max() <= 1
        assert tuple(meta) == (96 / image.shape[1], 96 / image.shape[0], 0, 0, image.shape[1], image.shape[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """JPEGs of two sizes, a PNG, a grayscale JPEG, a corrupt JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate([(96, 128)] * 5 + [(80, 60)] * 2):
        cv2.imwrite(str(root / f"im{i}.jpg"), textured(h, w, i))
    cv2.imwrite(str(root / "plain.png"), textured(70, 90, 9))
    cv2.imwrite(str(root / "gray.jpg"), cv2.cvtColor(textured(64, 64, 8), cv2.COLOR_BGR2GRAY))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (root / "notes.jpg").write_text("not an image")
    return root


def test_file_bytes_reads_every_byte_into_a_shareable_buffer(folder, tmp_path):
    for path in sorted(folder.iterdir()):
        data = file_bytes(path)
        assert isinstance(data, bytearray) and data == path.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert file_bytes(tmp_path / "empty.jpg") == bytearray()
    for unreadable in (tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(OSError):
            file_bytes(unreadable)


def test_decode_chunk_falls_back_to_opencv_and_counts(folder):
    paths = sorted(folder.iterdir())
    chunk = decode_chunk(paths, torch.device("cpu"))
    assert sorted(p.name for p in chunk.skipped) == ["broken.jpg", "notes.jpg"]
    assert chunk.on_host == 1                                     # the PNG
    assert len(chunk.images) == len(paths) - 2
    for path, image in zip(chunk.paths, chunk.images):
        ref = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        assert image.shape == (3, *ref.shape[:2]) and image.dtype == torch.uint8
        diff = np.abs(image.numpy().transpose(1, 2, 0)[:, :, ::-1].astype(int) - ref.astype(int))
        assert diff.mean() < 1.0, (path.name, diff.mean())        # libjpeg-turbo in both: (nearly) the same pixels
    assert chunk.host is None
    copies = decode_chunk(paths, torch.device("cpu"), host_copies=True)    # BGR arrays for the writers
    for image, bgr in zip(copies.images, copies.host):
        np.testing.assert_array_equal(bgr, image.numpy().transpose(1, 2, 0)[:, :, ::-1])
    # the background reader gives the same batches, in order
    batches = list(ImageBatches(paths, 4, torch.device("cpu")))
    assert [p for b in batches for p in b.paths] == chunk.paths
    assert sum(b.on_host for b in batches) == 1 and sum(len(b.skipped) for b in batches) == 2


def test_capture_guard_shares_among_users_and_captures_alone():
    guard, order = CaptureGuard(), []
    inside, release, captured = threading.Event(), threading.Event(), threading.Event()

    def user() -> None:
        with guard.using():
            order.append("a in")
            inside.set()
            release.wait(10)
            order.append("a out")

    def capture() -> None:
        with guard.capturing():
            order.append("capture")
            captured.set()
            release.wait(10)

    first = threading.Thread(target=user)
    first.start()
    assert inside.wait(10)
    with guard.using():                      # a second user enters while the first is inside: shared
        order.append("b in")
    capturer = threading.Thread(target=capture)
    capturer.start()
    assert not captured.wait(0.3)            # the capture waits for the user still inside
    release.set()
    first.join(10)
    assert captured.wait(10)
    capturer.join(10)
    assert order == ["a in", "b in", "a out", "capture"]
    # a user arriving during a capture waits for its end
    release.clear()
    captured.clear()
    entered = threading.Event()
    capturer = threading.Thread(target=capture)
    capturer.start()
    assert captured.wait(10)

    def late_user() -> None:
        with guard.using():
            entered.set()
    late = threading.Thread(target=late_user)
    late.start()
    assert not entered.wait(0.3)
    release.set()
    assert entered.wait(10)
    capturer.join(10)
    late.join(10)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    data = make_sample_dataset(tmp_path_factory.mktemp("data") / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))
    run = train.main(["--data", str(data), "--epochs", "1", "--img", "64", "--batch", "4", "--workers", "0",
                      "--device", "cpu", "--save-dir", str(tmp_path_factory.mktemp("logs")), "--name", "r"])
    return run / "best.pt"


def matched(a: np.ndarray, b: np.ndarray, iou: float = 0.9, score: float = 0.02) -> float:
    """Share of a's boxes with a box of b of the same class, IoU over `iou` and score within `score`."""
    if not len(a):
        return 1.0
    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda d: (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])   # noqa: E731
    ious = inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)
    same = (a[:, None, 5] == b[None, :, 5]) & (np.abs(a[:, None, 4] - b[None, :, 4]) < score)
    return float(((ious > iou) & same).any(1).mean())


def test_predict_tensors_gives_the_batch_and_boxes_of_predict(weights, folder):
    """Same metas exactly, pixels within a level, so the same boxes in original pixels (a barely trained model:
    a very low threshold keeps enough boxes to compare)."""
    yolo = YOLO(weights, device="cpu", conf=1e-4)
    bgr = [cv2.imread(str(p)) for p in sorted(folder.iterdir()) if p.name.startswith("im")]
    batch, metas = yolo.preprocess(bgr)
    tensor_batch, tensor_metas = yolo.preprocess_tensors([rgb_tensor(im) for im in bgr])
    np.testing.assert_array_equal(tensor_metas, metas)
    assert (tensor_batch.int() - batch.int()).abs().max() <= 1
    reference = yolo.predict(bgr)
    mine = yolo.predict_tensors([rgb_tensor(im) for im in bgr])
    assert sum(len(d) for d in reference) > 20
    for ref, got in zip(reference, mine):
        assert matched(ref, got) >= 0.9 and matched(got, ref) >= 0.9


def test_predict_cli_device_decode_matches_opencv(weights, folder, tmp_path, capsys):
    results = {}
    for decode in ("opencv", "device"):
        out = tmp_path / decode
        predict.main(["--weights", str(weights), "--source", str(folder), "--device", "cpu", "--conf", "0.0001",
                      "--decode", decode, "--save-txt", "--save-json", "--batch", "4", "--out", str(out)])
        results[decode] = (sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()),
                           json.loads((out / "predictions.json").read_text()))
        printed = capsys.readouterr()
        err = printed.err
        assert ("drawn and encoded there too" in printed.out + err) == (decode == "device")   # the start-up table
        assert "skipped 2 unreadable images" in err
        assert ("1 images were decoded by OpenCV" in err) == (decode == "device")
    assert results["device"][0] == results["opencv"][0]           # the same files: drawings, labels, json
    assert len(results["opencv"][0]) == 2 * 9 + 1                 # 9 readable images
    # the device path drew and encoded the images itself: each file is its image with the recorded boxes drawn
    names = YOLO(weights, device="cpu").class_names
    for name in ("im0.jpg", "im6.jpg"):
        source = decode_chunk([folder / name], torch.device("cpu"), host_copies=True).host[0]
        boxes = [[*e["box"], e["score"], e["class"]] for e in results["device"][1] if e["image"] == name]
        jpeg = lambda image: cv2.imdecode(cv2.imencode(".jpg", image)[1], cv2.IMREAD_COLOR).astype(int)  # noqa: E731
        saved = cv2.imread(str(tmp_path / "device" / name)).astype(int)
        assert boxes and saved.shape == source.shape      # small busy images: JPEG alone moves pixels by ~20
        assert np.abs(saved - jpeg(draw_detections(source, np.array(boxes), names))).mean() < 2
        assert np.abs(saved - jpeg(source)).mean() > 10
    by_image = {d: {} for d in results}
    for decode, (_, entries) in results.items():
        for e in entries:
            by_image[decode].setdefault(e["image"], []).append([*e["box"], e["score"], e["class"]])
    assert by_image["device"].keys() == by_image["opencv"].keys()
    for name, boxes in by_image["opencv"].items():
        assert matched(np.array(boxes), np.array(by_image["device"][name])) >= 0.8, name


def test_auto_decode_takes_the_device_path_for_more_than_one_batch_on_cuda(monkeypatch):
    """A single batch stays on the host: it would gain nothing and pay for importing torchvision."""
    from types import SimpleNamespace

    from utils.engine import predict_pipeline
    asked = []
    monkeypatch.setattr(predict_pipeline, "device_decode_available", lambda: asked.append(1) or True)
    on = lambda kind: SimpleNamespace(device=torch.device(kind))        # noqa: E731
    assert predict_pipeline.decode_mode("auto", on("cuda"), images=16, batch=16) == "opencv" and not asked
    assert predict_pipeline.decode_mode("auto", on("cuda"), images=17, batch=16) == "device" and asked
    assert predict_pipeline.decode_mode("auto", on("cpu"), images=1000, batch=16) == "opencv"
    assert predict_pipeline.decode_mode("device", on("cpu"), images=1, batch=16) == "device"


def test_no_save_images_writes_only_what_is_asked(weights, folder, tmp_path):
    out = tmp_path / "out"
    predict.main(["--weights", str(weights), "--source", str(folder), "--device", "cpu", "--decode", "device",
                  "--no-save-images", "--save-txt", "--out", str(out)])
    assert {p.parent.name for p in out.rglob("*") if p.is_file()} == {"labels"}
    assert len(list((out / "labels").iterdir())) == 9


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_nvjpeg_batches_and_the_cli_on_cuda(weights, folder, tmp_path, capsys):
    """On the GPU: nvJPEG pixels near libjpeg-turbo's, and the CLI's device path (reading thread, graph capture
    under the lock, background writer) gives the files and boxes of the host path."""
    device = torch.device("cuda", torch.cuda.current_device())
    paths = sorted(folder.iterdir())
    on_gpu, on_cpu = decode_chunk(paths, device, host_copies=True), decode_chunk(paths, torch.device("cpu"))
    assert on_gpu.paths == on_cpu.paths and on_gpu.on_host == on_cpu.on_host == 1
    for gpu_image, cpu_image in zip(on_gpu.images, on_cpu.images):
        assert gpu_image.is_cuda
        # nvJPEG upsamples chroma unlike libjpeg-turbo: 6.5 levels apart on average on these noise textures
        # (H200, torchvision 0.26); a channel swap is ~50 apart, a one-pixel shift ~16
        assert (gpu_image.cpu().int() - cpu_image.int()).abs().float().mean() < 10
    results = {}
    for decode in ("opencv", "device"):
        out = tmp_path / decode
        predict.main(["--weights", str(weights), "--source", str(folder), "--conf", "0.0001", "--decode", decode,
                      "--save-json", "--batch", "4", "--out", str(out)])
        capsys.readouterr()
        results[decode] = {e["image"]: [] for e in json.loads((out / "predictions.json").read_text())}
        for e in json.loads((out / "predictions.json").read_text()):
            results[decode][e["image"]].append([*e["box"], e["score"], e["class"]])
        assert len(list(out.glob("*.jpg"))) == 9
    assert results["device"].keys() == results["opencv"].keys()
    for name, boxes in results["opencv"].items():
        assert matched(np.array(boxes), np.array(results["device"][name])) >= 0.8, name

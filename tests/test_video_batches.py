"""Reading ahead on a thread (prefetched), and videos predicted in batches: the same annotated video as frame by
frame, every frame, in order."""
import threading

import cv2
import numpy as np
import pytest

import predict
import utils.engine.predict_pipeline as pipeline
from utils.data.prefetch import prefetched
from utils.data.sources import open_video, resolve_source
from utils.ops.plots import draw_detections


def test_prefetched_keeps_order_raises_where_it_failed_and_stops_when_closed():
    assert list(prefetched(iter(range(100)), 2)) == list(range(100))

    def failing():
        yield from range(5)
        raise OSError("disk gone")
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(failing(), 3):
            got.append(item)
    assert got == list(range(5))

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()
    items = prefetched(endless(), 2, name="endless-reader")
    assert [next(items), next(items)] == [0, 1]
    items.close()
    assert closed.is_set()
    assert not any(t.name == "endless-reader" for t in threading.enumerate())


class FrameYolo:
    """A stand-in model: one box per frame, placed by the frame's brightness; records the batch sizes asked.
    With `graphs`, each new batch size would capture a CUDA graph (as YOLO.captures says on CUDA)."""

    class_names = ["thing"]

    def __init__(self, graphs: bool = False):
        self.batches, self.graphs = [], graphs

    def captures(self, batch_size):
        return self.graphs and batch_size not in self.batches

    def predict(self, frames, batch_size=32):
        self.batches.append(len(frames))
        return [np.array([[x, 4, x + 16, 20, 0.9, 0]], np.float32) for x in (int(f.mean()) % 40 for f in frames)]

    def detect_image(self, frame, detections):
        return draw_detections(frame, detections, self.class_names)


def frames_of(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def test_a_video_in_batches_is_the_frame_by_frame_video(tmp_path, monkeypatch):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(11):
        writer.write(np.full((48, 64, 3), 15 * i + 10, np.uint8))
    writer.release()
    monkeypatch.setattr(pipeline, "draw_fps", lambda image, fps, avoid=(): image)     # the rate drawn varies
    made = {}
    for run, batch, graphs in (("one", 1, False), ("four", 4, False), ("graphs", 4, True)):
        out = tmp_path / run
        out.mkdir()
        args = predict.parse_args(["--weights", "w.pt", "--source", str(video)])
        yolo = FrameYolo(graphs)
        outputs = pipeline.Outputs(args, yolo, out, None)
        source = resolve_source(str(video))
        pipeline.predict_video(yolo, source, open_video(source), outputs, batch)
        outputs.finish()
        made[run] = (yolo.batches, frames_of(out / "clip.mp4"))
    # the last 3 frames padded to a batch of 4 where a batch of 3 would capture a graph of its own
    assert made["one"][0] == [1] * 11 and made["four"][0] == [4, 4, 3] and made["graphs"][0] == [4, 4, 4]
    assert len(made["one"][1]) == len(made["four"][1]) == len(made["graphs"][1]) == 11
    for one, four, padded in zip(made["one"][1], made["four"][1], made["graphs"][1]):
        np.testing.assert_array_equal(one, four)
        np.testing.assert_array_equal(one, padded)
    # the boxes moved with the frames' brightness: the frames are distinct, so equal lists mean the same order
    assert len({frame.tobytes() for frame in made["four"][1]}) == 11


def test_large_frames_come_in_smaller_batches():
    assert pipeline.video_batch(16, (640, 480)) == 16
    assert pipeline.video_batch(64, (1920, 1080)) == pipeline.VIDEO_BATCH_BYTES // (3 * 1920 * 1080) == 21
    assert pipeline.video_batch(16, (3840, 2160)) == 5
    assert pipeline.video_batch(16, (100_000, 100_000)) == 1

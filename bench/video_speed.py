"""Video prediction speed: predict.py's video loop frame by frame (--batch 1) against batches of frames.

  python bench/video_speed.py --weights /tmp/logs/a/best.pt --images VOCdevkit/BCCD/JPEGImages --frames 1500

A video is made from the JPEGs of --images (resized to --size, in order, repeated up to --frames frames, mp4v at
25 fps). Each timed pass runs predict_video (read, model, draw, write the annotated mp4) on the whole video after
a warm-up pass of each batch size; the batch sizes alternate within each of --passes rounds, so a host that slows
as it writes slows them alike. Reports frames a second of each pass (frames / the loop's seconds). With
--stage-times, one more pass of the largest batch size with each stage timed in wall and CPU seconds of its thread:
reading frames (OpenCV's decoder, the reading thread), the model (letterbox, model, NMS: the main loop), on the
drawing thread the drawing and the rate overlay, and OpenCV's mp4 encoder on the writing thread; the thread whose
seconds are nearest the pass's bounds it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import predict  # noqa: E402
from utils.data.sources import open_video, resolve_source  # noqa: E402
from utils.engine.predict_pipeline import Outputs, predict_video  # noqa: E402
from yolo import YOLO  # noqa: E402


def make_video(images: Path, frames: int, size: tuple[int, int], path: Path) -> Path:
    """An mp4 of `frames` frames: the folder's JPEGs resized to size (w, h), in name order, repeated."""
    sources = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"no JPEGs in {images}")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, size)
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path} (no mp4v encoder in this OpenCV?)")
    pictures = [cv2.resize(cv2.imread(str(p)), size) for p in sources[:frames]]
    for i in range(frames):
        writer.write(pictures[i % len(pictures)])
    writer.release()
    return path


def video_run(yolo: YOLO, video: Path, out: Path, batch: int) -> float:
    """Seconds for predict.py's video loop over `video`, its annotated copy written under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    args = predict.parse_args(["--weights", yolo.weights, "--source", str(video), "--batch", str(batch)])
    outputs = Outputs(args, yolo, out, None)
    source = resolve_source(str(video))
    cap = open_video(source)
    if yolo.device.type == "cuda":
        torch.cuda.synchronize(yolo.device)
    start = time.perf_counter()
    predict_video(yolo, source, cap, outputs, batch)
    outputs.finish()
    return time.perf_counter() - start


def stage_times(yolo: YOLO, video: Path, out: Path, batch: int) -> tuple[float, list[tuple[str, float, float, int]]]:
    """The loop's seconds over `video`, and (stage, seconds, CPU seconds of its thread, calls) for each stage."""
    import utils.engine.predict_pipeline as pipeline  # noqa: PLC0415

    totals: dict[str, list[float]] = {}

    def timed(label: str, fn):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = totals.setdefault(label, [0.0, 0.0, 0])
                entry[0] += time.perf_counter() - wall
                entry[1] += time.thread_time() - cpu
                entry[2] += 1
        return wrapper

    class TimedWriter:
        """OpenCV's writer with its `write` timed."""
        def __init__(self, writer):
            self.writer, self.write = writer, timed("writing thread: mp4 encode (VideoWriter.write)", writer.write)

        def __getattr__(self, name):
            return getattr(self.writer, name)

    def timed_batches(cap, size):
        batches = originals[1](cap, size)
        read = timed("reading thread: read + decode frames", lambda: next(batches, None))
        while (frames := read()) is not None:
            yield frames

    originals = (pipeline.open_writer, pipeline.frame_batches, pipeline.draw_fps, pipeline.detection_rects)
    pipeline.open_writer = lambda *a: TimedWriter(originals[0](*a))
    pipeline.frame_batches = timed_batches
    pipeline.draw_fps = timed("drawing thread: rate overlay", originals[2])
    pipeline.detection_rects = timed("drawing thread: label layout for the overlay", originals[3])
    yolo.predict = timed("main: letterbox + model + NMS (yolo.predict)", yolo.predict)
    yolo.detect_image = timed("drawing thread: boxes drawn (detect_image)", yolo.detect_image)
    try:
        seconds = video_run(yolo, video, out, batch)
    finally:
        pipeline.open_writer, pipeline.frame_batches, pipeline.draw_fps, pipeline.detection_rects = originals
        del yolo.predict, yolo.detect_image
    return seconds, [(label, *values) for label, values in totals.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--images", default="VOCdevkit/BCCD/JPEGImages", help="folder of JPEGs the video is made of")
    p.add_argument("--frames", type=int, default=1500)
    p.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    p.add_argument("--batches", default="1,16", help="batch sizes compared, comma-separated")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--tmp", default=None, help="where the video and the outputs go (default the system's)")
    p.add_argument("--stage-times", action="store_true", help="also time each stage over one pass (what bounds it)")
    args = p.parse_args()
    yolo = YOLO(args.weights, device=args.device)
    name = torch.cuda.get_device_name(yolo.device) if yolo.device.type == "cuda" else "CPU"
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device {name}, torch {torch.__version__}, {args.frames} frames of {args.size[0]}x{args.size[1]}")
    rates: dict[int, list[float]] = {b: [] for b in batches}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        video = make_video(Path(args.images), args.frames, tuple(args.size), Path(tmp) / "clip.mp4")
        warm = make_video(Path(args.images), 2 * max(batches), tuple(args.size), Path(tmp) / "warm.mp4")
        for b in batches:
            video_run(yolo, warm, Path(tmp) / "out", b)
        for _ in range(args.passes):
            for b in batches:
                rates[b].append(args.frames / video_run(yolo, video, Path(tmp) / "out", b))
        if args.stage_times:
            seconds, stages = stage_times(yolo, video, Path(tmp) / "out", max(batches))
    for b, r in rates.items():
        print(f"--batch {b:3d}: " + ", ".join(f"{x:,.0f}" for x in r) + " frames/s")
    if args.stage_times:
        print(f"stages of one pass at --batch {max(batches)} ({args.frames} frames in {seconds:.2f} s, timers"
              " included; seconds, CPU seconds of the thread, calls):")
        width = max(len(label) for label, *_ in stages)
        for label, wall, cpu, calls in stages:
            print(f"  {label.ljust(width)}  {wall:6.2f} s  CPU {cpu:6.2f} s  ({calls} calls)")


if __name__ == "__main__":
    main()

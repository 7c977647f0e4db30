"""The host side of saving drawn predictions, without a GPU: how fast predict.py's Outputs (one drawing thread, a
pool of writer threads) takes images while the main loop keeps issuing small torch ops, as its GPU loop does.

  python bench/save_pipeline.py --images VOCdevkit/BCCD/JPEGImages --count 1000

A thread that releases the GIL (every torch op, NumPy's large copies, OpenCV calls) may wait up to the
interpreter's switch interval (5 ms) to get it back while another thread runs Python. Rows:
  drawing alone / beside a busy Python thread: draw_detections on one thread, images/s;
  torch ops alone / beside a drawing thread: small CPU torch ops issued by this thread, per second;
  pipeline: the main loop issues --ops torch ops per batch of --batch images, then hands the batch to
  Outputs (drawings written as JPEGs by the writer pool); images/s from the first batch to the last file
  written. On a machine of few cores the JPEG encoding bounds this row.
Detections are --boxes random boxes of 3 classes per image.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data.dataset import load_image  # noqa: E402
from utils.engine.predict_pipeline import Outputs  # noqa: E402
from utils.ops.plots import draw_detections  # noqa: E402

NAMES = ["RBC", "WBC", "Platelets"]


class Drawing:
    """What Outputs needs of a YOLO: class names and detect_image."""

    class_names = NAMES

    def detect_image(self, image: np.ndarray, detections: np.ndarray) -> np.ndarray:
        return draw_detections(image, detections, NAMES)


def random_detections(rng: np.random.Generator, count: int, boxes: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    h, w = shape[:2]
    out = []
    for _ in range(count):
        xy = rng.uniform(0, 1, (boxes, 2)) * (w - 60, h - 60)
        wh = rng.uniform(20, 100, (boxes, 2))
        out.append(np.concatenate([xy, xy + wh, rng.uniform(0.3, 1, (boxes, 1)),
                                   rng.integers(0, len(NAMES), (boxes, 1))], 1).astype(np.float32))
    return out


def drawing_rate(images: list[np.ndarray], dets: list[np.ndarray], busy: bool, seconds: float = 2.0) -> float:
    """Images/s of draw_detections on this thread, alone or beside a thread running Python."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    other = threading.Thread(target=spin) if busy else None
    if other:
        other.start()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        draw_detections(images[done % len(images)], dets[done % len(dets)], NAMES)
        done += 1
    elapsed = time.perf_counter() - start
    stop.set()
    if other:
        other.join()
    return done / elapsed


def ops_beside_drawing(images: list[np.ndarray], dets: list[np.ndarray], seconds: float = 2.0) -> tuple[float, float]:
    """(small torch ops/s on this thread, images/s drawn) while a second thread draws: what the main loop of a
    folder prediction meets."""
    stop = threading.Event()
    drawn = [0]

    def draw() -> None:
        while not stop.is_set():
            draw_detections(images[drawn[0] % len(images)], dets[drawn[0] % len(dets)], NAMES)
            drawn[0] += 1

    x = torch.rand(64, 100)
    drawer = threading.Thread(target=draw)
    drawer.start()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x.mul(2).sum()
        done += 1
    elapsed = time.perf_counter() - start
    stop.set()
    drawer.join()
    return done / elapsed, drawn[0] / elapsed


def pipeline_rate(images: list[np.ndarray], dets: list[np.ndarray], count: int, batch: int, ops: int) -> float:
    """Images/s through Outputs while the main loop issues `ops` small torch ops per batch."""
    out = Path(tempfile.mkdtemp(prefix="save_pipeline_"))
    args = argparse.Namespace(save_txt=False, save_conf=False, save_json=False, save_images=True, crop=False,
                              show=False, count=False)
    outputs = Outputs(args, Drawing(), out, None)
    x = torch.rand(64, 100)
    start = time.perf_counter()
    try:
        for first in range(0, count, batch):
            for _ in range(ops):
                x.mul(2).sum()
            chunk = range(first, min(first + batch, count))
            pictures = [images[i % len(images)].copy() for i in chunk]
            outputs.images([f"{i:06d}.jpg" for i in chunk], pictures, [im.shape[:2] for im in pictures],
                           [dets[i % len(dets)] for i in chunk])
        outputs.finish()
        return count / (time.perf_counter() - start)
    finally:
        outputs.close()
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="VOCdevkit/BCCD/JPEGImages", help="folder of images to draw on")
    p.add_argument("--count", type=int, default=1000, help="images through the pipeline")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ops", type=int, default=200, help="small torch ops the main loop issues per batch")
    p.add_argument("--boxes", type=int, default=19, help="detections per image (BCCD's trained model: ~19)")
    args = p.parse_args()
    paths = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))[:64]
    images = [load_image(q) for q in paths]
    dets = random_detections(np.random.default_rng(0), 64, args.boxes, images[0].shape)
    torch.set_num_threads(1)
    for busy in (False, True):
        drawing_rate(images, dets, busy, seconds=0.3)          # label caches warm
        print(f"drawing {'beside a busy Python thread' if busy else 'alone':<30} "
              f"{drawing_rate(images, dets, busy):8,.0f} img/s", flush=True)
    x, start, done = torch.rand(64, 100), time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        x.mul(2).sum()
        done += 1
    print(f"torch ops alone {done / (time.perf_counter() - start):31,.0f} ops/s", flush=True)
    ops, drawn = ops_beside_drawing(images, dets)
    print(f"torch ops beside a drawing thread {ops:13,.0f} ops/s ({drawn:,.0f} img/s drawn)", flush=True)
    rate = pipeline_rate(images, dets, args.count, args.batch, args.ops)
    print(f"pipeline, {args.ops} torch ops a batch {rate:15,.0f} img/s", flush=True)


if __name__ == "__main__":
    main()

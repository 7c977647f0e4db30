"""Where the detections of images, folders and videos go: batches decoded on the host or the device, every
image's files written by background threads (Outputs), annotated videos; predict.py's image and video modes."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from utils.data.dataset import ImageReadError, load_image
from utils.data.image_batches import DecodedBatch, ImageBatches, device_decode_available
from utils.data.prefetch import prefetched
from utils.data.sources import Source, display_available
from utils.engine.folders import OutputError, inside, make_dir, safe_component, write_text
from utils.engine.predict_io import (BackgroundWrites, UniqueStems, class_counts, draw_fps, encode_jpegs, json_text,
                                     keep_classes, save_crops, write_files, write_image, yolo_label_files)
from utils.log import get_logger
from utils.ops.capture_guard import CaptureGuard
from utils.ops.draw_tensors import paint, plan_drawing
from utils.ops.plots import detection_rects
from utils.ops.streams import adopt, made_event, on_stream, side_stream
from yolo import YOLO

log = get_logger(__name__)

BATCHES_PENDING = 8    # device-encoded batches whose JPEG bytes may wait for the writers (memory stays bounded)


class Outputs:
    """Writes every product of a prediction run under one folder; images' files are made in the background.

    Two stages: one thread draws (drawing is Python holding the GIL, box by box: with several threads they
    only queue for it, and measured slower than one), a pool of threads encodes and writes (OpenCV's encoder
    releases the GIL). Labels and predictions.json's objects are made and written by that pool a batch a job
    (`images`). With --show everything runs on the main thread, which owns the window.

    device_images: the images come as tensors on the model's device (--decode device). They are then drawn and
    JPEG-encoded there (`drawn_on_device`), a batch at a time, by two more stages of one thread each, so that
    the main loop goes on with the next batch meanwhile: painting (the drawing planned on the host, painted on
    the device) and encoding (torchvision's nvJPEG encoder, which waits for each image on the calling thread;
    the bytes copied back and handed to a pool of batch writers, a batch's files a job). Both use CUDA inside
    `cuda_guard.using()`; a caller about to capture a CUDA graph enters `cuda_guard.capturing()`. Painting has a
    CUDA stream of its own; encoding stays on the legacy default stream, where torchvision's encoder copies each
    image's bytes out, so that the copy back is ordered after those copies (the model runs on a stream of its own,
    `_device_batches`). Pixels are copied back to the host only for --crop and --show.
    """

    def __init__(self, args: argparse.Namespace, yolo: YOLO, out: Path, wanted: set[int] | None,
                 device_images: bool = False):
        self.args, self.yolo, self.out, self.wanted = args, yolo, out, wanted
        self.stems = UniqueStems()
        self.totals: Counter = Counter()
        self.json_parts: list[str] = []                # each batch's piece of predictions.json, in batch order
        self.labels_folder: Path | None = None
        self.show = args.show and display_available()
        if args.show and not self.show:
            log.warning("--show: no display here; results are only saved")
        self.draws_on_device = device_images and args.save_images and not self.show
        self.needs_pixels = (args.save_images and not self.draws_on_device) or args.crop or self.show
        self.drawing = BackgroundWrites(threads=0 if self.show else 1, window=16, name="drawing")
        # two batches of device images at most wait for each stage (the GPU memory they hold stays bounded)
        on_device = 1 if self.draws_on_device else 0
        self.painting = BackgroundWrites(threads=on_device, window=2, name="painting")
        self.encoding = BackgroundWrites(threads=on_device, window=2, name="encoding")
        self.paint_stream = side_stream(yolo.device) if self.draws_on_device else None
        self.cuda_guard = CaptureGuard()
        self.writes = BackgroundWrites(threads=0 if self.show else None)   # fed by the stages above and `images`
        # a device-encoded batch's files are one job: while files go out faster than batches come, one writer
        # thread at a time is busy, not all of them taking turns at the interpreter (which slows the main loop);
        # when they go out slower (a disk), the next batches' jobs start on the other threads
        self.batch_writes = BackgroundWrites(threads=None if self.draws_on_device else 0, window=BATCHES_PENDING,
                                             name="batch-writer")

    def images(self, names: list[str], pictures: list[np.ndarray | None], sizes: list[tuple[int, int]],
               detections: list[np.ndarray], wait_ms: int = 1) -> tuple[list[str], list[np.ndarray]]:
        """Record a batch of images' results (their BGR pixels needed only when `needs_pixels`; sizes (h, w)).
        Their files are made in the background: drawings an image a job, labels and JSON objects a batch a job (a
        job an image, with its turns at the interpreter, slowed the main loop to ~700 img/s: bench/RESULTS.md,
        twelfth session). The totals are counted once a batch. Returns the stems their files are named by (safe
        and distinct: a.jpg and a.png do not overwrite each other) and the detections kept."""
        kept = [keep_classes(d, self.wanted) for d in detections]
        stems = [self.stems(name) for name in names]
        if kept:
            self.totals.update(class_counts(np.concatenate(kept), self.yolo.class_names))
        if self.args.count:
            for name, det in zip(names, kept):
                counts = class_counts(det, self.yolo.class_names)
                log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing")
        if self.args.save_txt and kept:
            self.writes.submit(self._write_labels, list(zip(stems, sizes, kept)))
        if self.args.save_json and kept:
            self.json_parts.append("")                      # its place, taken before the job fills it
            self.writes.submit(self._json_part, len(self.json_parts) - 1, list(zip(names, kept)))
        if self.needs_pixels:
            for stem, picture, size, det in zip(stems, pictures, sizes, kept):
                if picture is not None:
                    self.drawing.submit(self._draw, stem, picture, size, det, wait_ms)
        return stems, kept

    def drawn_on_device(self, stems: list[str], images: list[torch.Tensor], detections: list[np.ndarray],
                        made: torch.cuda.Event | None = None) -> None:
        """A batch's images (RGB [3,H,W] tensors on the device, ready once `made` has happened) drawn and
        JPEG-encoded there, their bytes written, all in the background."""
        self.painting.submit(self._paint, stems, images, detections, made)

    def _paint(self, stems: list[str], images: list[torch.Tensor], detections: list[np.ndarray],
               made: torch.cuda.Event | None) -> None:
        """Painting stage: the drawing planned on the host (no CUDA, so outside the guard), painted on the device."""
        plan = plan_drawing([(int(im.shape[1]), int(im.shape[2])) for im in images], detections,
                            self.yolo.class_names)
        with self.cuda_guard.using(), on_stream(self.paint_stream):
            adopt(images, made)
            drawn = paint(images, plan)
            done = made_event(drawn[0].device)
        self.encoding.submit(self._encode, stems, drawn, done)

    def _encode(self, stems: list[str], drawn: list[torch.Tensor], done: torch.cuda.Event | None) -> None:
        """Encoding stage: the painted images JPEG-encoded on the device, the bytes copied back and handed to the
        writers."""
        with self.cuda_guard.using():
            if done is not None:
                # torchvision encodes on a stream of its own that does not wait for the painting's
                done.synchronize()
            # on the legacy default stream (this thread's current one): torchvision copies each image's bytes out
            # on it, so encode_jpegs' concatenation of them is ordered after those copies
            encoded = encode_jpegs(drawn)
        self.batch_writes.submit(write_files, inside(self.out),
                                 [(f"{stem}.jpg", data) for stem, data in zip(stems, encoded)])

    def _draw(self, stem: str, image: np.ndarray, size: tuple[int, int], detections: np.ndarray,
              wait_ms: int) -> None:
        """One image's files, on the drawing thread: the drawing made here, it and the crops handed to the writers;
        with --show, the window too (main thread)."""
        if (self.args.save_images and not self.draws_on_device) or self.show:
            drawn = self.yolo.detect_image(image, detections)
            if self.args.save_images:
                self.writes.submit(write_image, inside(self.out, f"{stem}.jpg"), drawn)
            if self.show:
                cv2.imshow("predict", drawn)
                cv2.waitKey(wait_ms)
        if self.args.crop:
            self.writes.submit(save_crops, inside(self.out, "crops"), stem, image, detections, self.yolo.class_names)

    def _write_labels(self, labels: list[tuple[str, tuple[int, int], np.ndarray]]) -> None:
        """A batch's label files (a writer job), in labels/ (made by the first job)."""
        if self.labels_folder is None:
            self.labels_folder = make_dir(inside(self.out, "labels"))
        texts = yolo_label_files([(det, w, h) for _, (h, w), det in labels], self.args.save_conf)
        write_files(self.labels_folder, [(f"{stem}.txt", text) for (stem, _, _), text in zip(labels, texts)])

    def _json_part(self, number: int, records: list[tuple[str, np.ndarray]]) -> None:
        """A batch's piece of predictions.json (a writer job)."""
        self.json_parts[number] = json_text(records, self.yolo.class_names)

    def finish(self) -> None:
        """Wait for the drawing, then the writes (raising the first failure), then write predictions.json."""
        try:
            self.drawing.finish()
            self.painting.finish()
            self.encoding.finish()
            self.batch_writes.finish()
            self.writes.finish()
        finally:
            self.close()
        if self.args.save_json:        # a list of the detections' objects, one a line
            parts = [part for part in self.json_parts if part]
            write_text(inside(self.out, "predictions.json"), "[\n" + ",\n".join(parts) + "\n]\n" if parts else "[]\n")

    def close(self) -> None:
        """Stop every stage (jobs not started are dropped): after a failure elsewhere."""
        self.drawing.close()
        self.painting.close()
        self.encoding.close()
        self.batch_writes.close()
        self.writes.close()


def decode_mode(requested: str, yolo: YOLO, images: int, batch: int) -> str:
    """--decode auto -> device on CUDA for more than one batch of images where torchvision can decode JPEGs,
    else opencv; device without it is an error.

    A single batch gains nothing from the device path (there is no next batch to read while one is predicted)
    and would pay for importing torchvision, which imports torch._dynamo: 1.3 s on the development machine,
    5.1 s on a slow GPU host (bench/RESULTS.md, seventh session)."""
    if requested == "auto":
        wanted = yolo.device.type == "cuda" and images > batch
        return "device" if wanted and device_decode_available() else "opencv"
    if requested == "device" and not device_decode_available():
        raise ValueError("--decode device: this torchvision has no decode_jpeg; use --decode opencv")
    return requested


def predict_images(yolo: YOLO, source: Source, outputs: Outputs, batch: int, decode: str = "opencv") -> None:
    """Every image of the source, batched; unreadable ones are skipped and counted (a single one is an error)."""
    paths, skipped, found, on_host = source.paths, [], 0, 0
    single = len(paths) == 1
    made = (_device_batches(yolo, paths, batch, outputs.needs_pixels, outputs.cuda_guard) if decode == "device" else
            _opencv_batches(yolo, paths, batch))
    try:
        for chunk, images, sizes, dets in made:
            skipped += chunk.skipped
            on_host += chunk.on_host
            stems, kept = outputs.images([path.name for path in chunk.paths], images, sizes, dets,
                                         wait_ms=0 if single else 1)
            found += sum(len(det) for det in kept)
            if outputs.draws_on_device and stems:
                outputs.drawn_on_device(stems, chunk.images, kept, chunk.made)
        outputs.finish()
    finally:
        made.close()                   # stops the reading thread at once if a write failed
        outputs.close()
    if on_host:
        log.warning("%d images were decoded by OpenCV on the host (not JPEG, or decode_jpeg refused them)", on_host)
    if skipped:
        log.warning("skipped %d unreadable images (first: %s)", len(skipped), skipped[0])
    summary = ", ".join(f"{k} {v}" for k, v in sorted(outputs.totals.items())) or "no objects"
    log.info("%d images, %d objects (%s) -> %s", len(paths) - len(skipped), found, summary, outputs.out)


def _opencv_batches(yolo: YOLO, paths: list[Path], batch: int):
    """(chunk, BGR arrays, sizes, detections) per batch: decoded by OpenCV here, letterboxed on host threads."""
    for start in tqdm(range(0, len(paths), batch), desc="predict", disable=len(paths) <= batch, file=sys.stdout):
        chunk = DecodedBatch([], [])
        images = []
        for path in paths[start:start + batch]:
            try:
                images.append(load_image(path))
                chunk.paths.append(path)
            except ImageReadError:
                if len(paths) == 1:
                    raise
                chunk.skipped.append(path)
        yield chunk, images, [im.shape[:2] for im in images], yolo.predict(images, batch_size=batch) if images else []


def _device_batches(yolo: YOLO, paths: list[Path], batch: int, needs_pixels: bool, guard: CaptureGuard):
    """(chunk, BGR arrays or Nones, sizes, detections) per batch: read and decoded on a background thread, on the
    model's device; the arrays are copied back there only when the outputs need pixels."""
    batches = ImageBatches(paths, batch, yolo.device, host_copies=needs_pixels, guard=guard)
    # the model's batches on a high-priority stream of their own: they do not queue behind the reader's, painting's
    # or encoding's work, and CUDA runs their kernels first when those wait too
    stream = side_stream(yolo.device, high_priority=True)
    for chunk in tqdm(batches, total=len(batches), desc="predict", disable=len(paths) <= batch, file=sys.stdout):
        # no CUDA on the other threads while a graph is captured
        capture = guard.capturing() if yolo.captures(len(chunk.images)) else nullcontext()
        with on_stream(stream), capture:
            chunk.adopt()
            dets = yolo.predict_tensors(chunk.images)
        sizes = [tuple(im.shape[1:]) for im in chunk.images]
        yield chunk, chunk.host or [None] * len(chunk.images), sizes, dets


def open_writer(path: Path, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """An mp4 writer; one OpenCV cannot open (no codec, unwritable folder) is an OutputError before any frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise OutputError(path, "OpenCV could not open a video writer (no mp4v codec, full disk or unwritable folder?)")
    return writer


VIDEO_BATCHES_AHEAD = 1        # batches of frames read ahead of the model, waiting to be drawn, to be written
VIDEO_BATCH_BYTES = 128 * 2 ** 20   # a batch of frames holds at most this much (4K frames: 5 a batch)


def video_batch(batch: int, size: tuple[int, int]) -> int:
    """--batch for frames of size (w, h), made smaller where a batch of them would pass VIDEO_BATCH_BYTES: about
    seven batches are held at once (read ahead, being read, in the model, being drawn and waiting to be, being
    written and waiting to be)."""
    return max(1, min(batch, VIDEO_BATCH_BYTES // max(1, 3 * size[0] * size[1])))


def frame_batches(cap: cv2.VideoCapture, batch: int) -> Iterator[list[np.ndarray]]:
    """Lists of up to `batch` frames (BGR arrays) until the stream ends or a frame cannot be decoded."""
    while True:
        frames = []
        while len(frames) < batch:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        if frames:
            yield frames
        if len(frames) < batch:
            return


def predict_video(yolo: YOLO, source: Source, cap: cv2.VideoCapture, outputs: Outputs, batch: int = 1) -> None:
    """Annotated copy of a video or webcam stream: same size and frame rate, every frame, the measured rate drawn
    (frames a second through the whole loop, smoothed over about ten frames).

    A video file goes through in batches of `batch` frames (fewer for large frames, `video_batch`): a thread
    reads (OpenCV decodes without the interpreter lock) the next batch while the model runs on this one, another
    draws the frames and a third encodes them into the mp4 in order. A last, shorter batch is padded with its last
    frame when its size would capture a CUDA graph of its own. A webcam, and any stream with --show, goes frame
    by frame on this thread, which owns the window: live, without waiting for a batch to fill."""
    fps_in = cap.get(cv2.CAP_PROP_FPS) or 30.0
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    name = f"webcam{source.webcam}" if source.kind == "webcam" else safe_component(source.paths[0].stem)
    path = inside(outputs.out, f"{name}.mp4")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "video" else None
    live = source.kind == "webcam" or outputs.show
    batch = 1 if live else video_batch(batch, size)
    frames, fps = 0, 0.0
    quit_early = threading.Event()
    try:
        writer = open_writer(path, fps_in, size)
    except OutputError:
        cap.release()
        raise

    def draw(batch_frames: list[np.ndarray], detections: list[np.ndarray], rate: float) -> None:
        """A batch's frames drawn, in order, and handed to the writing thread (on the drawing thread, or all on
        this one when live)."""
        drawn_frames = []
        for frame, dets in zip(batch_frames, detections):
            drawn = draw_fps(yolo.detect_image(frame, dets), rate,
                             avoid=detection_rects(dets, yolo.class_names, frame.shape))
            drawn_frames.append(drawn)
            if outputs.show:
                cv2.imshow("predict", drawn)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    quit_early.set()
                    break
        writing.submit(write_frames, drawn_frames)

    def write_frames(drawn_frames: list[np.ndarray]) -> None:
        """Frames encoded into the mp4, in order: OpenCV's encoder, ~4 ms a 640x480 frame on an H200's host, is the
        loop's bound, so it has a thread of its own (bench/RESULTS.md, fourteenth session)."""
        for drawn in drawn_frames:
            writer.write(drawn)

    drawing = BackgroundWrites(threads=0 if live else 1, window=VIDEO_BATCHES_AHEAD, name="video-drawing")
    writing = BackgroundWrites(threads=0 if live else 1, window=VIDEO_BATCHES_AHEAD, name="video-writing")
    batches = frame_batches(cap, batch) if live else prefetched(frame_batches(cap, batch), VIDEO_BATCHES_AHEAD,
                                                                name="video-reading")
    bar = tqdm(total=total, desc=name, file=sys.stdout)
    start = last = time.perf_counter()
    try:
        for batch_frames in batches:
            short = batch - len(batch_frames)
            padded = batch_frames + batch_frames[-1:] * short if short and not yolo.captures(batch) \
                and yolo.captures(len(batch_frames)) else batch_frames
            detections = [keep_classes(d, outputs.wanted)
                          for d in yolo.predict(padded, batch_size=len(padded))[:len(batch_frames)]]
            now = time.perf_counter()
            rate = len(batch_frames) / max(now - last, 1e-9)
            keep = 0.9 ** len(batch_frames) if fps else 0.0          # smoothed as frame by frame at 0.9
            fps, last = keep * fps + (1 - keep) * rate, now
            drawing.submit(draw, batch_frames, detections, fps)
            frames += len(batch_frames)
            bar.update(len(batch_frames))
            if quit_early.is_set():
                break
        drawing.finish()
        writing.finish()
    finally:
        try:
            drawing.close()
            writing.close()
            bar.close()
        finally:
            try:
                batches.close()        # the reading thread stops before the capture goes
            finally:
                cap.release()
                writer.release()
    seconds = time.perf_counter() - start
    if frames and (not path.is_file() or path.stat().st_size == 0):     # VideoWriter.write never reports a failure
        raise OutputError(path, f"the video writer wrote nothing for {frames} frames (full disk?)")
    if total and total > 0 and frames < total and not quit_early.is_set():
        log.warning("%s: read %d of %d frames; the rest could not be decoded (a truncated or damaged video)",
                    source.paths[0], frames, total)
    log.info("%d frames in %.1f s (%.1f frames/s) -> %s", frames, seconds, frames / max(seconds, 1e-9), path)

"""Saving what predict.py finds: drawn images, YOLO-format labels, JSON, crops, counts.

Every name taken from data (image stems, class names) passes through `safe_component` and every
path through `inside`, so a hostile class name or file name cannot write outside the output folder.
"""
from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from utils.engine.folders import OutputError, inside, make_dir, safe_component
from utils.ops import fixed_text
from utils.ops.plots import Rect, free_corner


def parse_class_filter(spec: str | None, class_names: list[str]) -> set[int] | None:
    """--classes 'person,2' -> class indices; unknown names or indices are an error."""
    if not spec:
        return None
    wanted = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and int(item) < len(class_names):
            wanted.add(int(item))
        elif item in class_names:
            wanted.add(class_names.index(item))
        else:
            raise ValueError(f"--classes: {item!r} is neither a class of this model nor an index 0-{len(class_names) - 1}"
                             f" (classes: {', '.join(class_names)})")
    return wanted


def keep_classes(detections: np.ndarray, wanted: set[int] | None) -> np.ndarray:
    """Only the detections of the wanted classes (all when None)."""
    if wanted is None:
        return detections
    return detections[np.isin(detections[:, 5].astype(int), list(wanted))]


def yolo_label_text(detections: np.ndarray, width: int, height: int, score: bool = False) -> str:
    """A YOLO label file's text: a line per box, class cx cy w h normalised to the image, then the score when
    `score`. The arithmetic is in the detections' own dtype, as box by box. The rule yolo_label_files follows
    for a whole batch."""
    d = np.asarray(detections)
    if not len(d):
        return ""
    columns = [d[:, 5].astype(np.int64), (d[:, 0] + d[:, 2]) / 2 / width, (d[:, 1] + d[:, 3]) / 2 / height,
               (d[:, 2] - d[:, 0]) / width, (d[:, 3] - d[:, 1]) / height] + ([d[:, 4]] if score else [])
    line = "{} {:.6f} {:.6f} {:.6f} {:.6f}" + (" {:.5f}" if score else "") + "\n"
    return "".join(line.format(*row) for row in zip(*(c.tolist() for c in columns)))


def json_objects(name: str, detections: np.ndarray, class_names: list[str]) -> list[str]:
    """Each detection as the text of a JSON object: image, class, class_name, score (5 decimals), box [x1, y1,
    x2, y2] (2 decimals). Formatted directly: json.dumps an object costs several times more, and predict.py makes
    one per detection. A detection with a number that is not finite goes through json.dumps (NaN, Infinity),
    its finite numbers rounded alike. A class id the names do not cover is named by its number (as class_counts
    counts it). The rule json_text follows for a whole batch."""
    image, names = json.dumps(name), [json.dumps(n) for n in class_names]
    objects = []
    for x1, y1, x2, y2, score, c in np.asarray(detections, np.float64).tolist():
        c = int(c)
        known = 0 <= c < len(class_names)
        if math.isfinite(x1 + y1 + x2 + y2 + score):
            class_name = names[c] if known else json.dumps(str(c))
            objects.append(f'{{"image": {image}, "class": {c}, "class_name": {class_name}, "score": {score:.5f}, '
                           f'"box": [{x1:.2f}, {y1:.2f}, {x2:.2f}, {y2:.2f}]}}')
        else:
            objects.append(json.dumps({"image": name, "class": c, "class_name": class_names[c] if known else str(c),
                                       "score": round(score, 5), "box": [round(v, 2) for v in (x1, y1, x2, y2)]}))
    return objects


def yolo_label_files(labels: list[tuple[np.ndarray, int, int]], score: bool = False) -> list[bytes]:
    """yolo_label_text of a batch's images ((detections, width, height) each), as bytes: the whole batch's lines
    made at once by NumPy (utils.ops.fixed_text) when they can be made exactly so (float32 detections, finite,
    not negative: what the model gives), else image by image."""
    dets = [np.asarray(d) for d, _, _ in labels]
    rows = np.array([len(d) for d in dets], np.int64)
    if not rows.sum():
        return [b""] * len(labels)
    # every image's own arithmetic in float32: its detections float32 (a float16 image among float32 ones would be
    # concatenated to float32) and its size Python numbers (a NumPy int64 width would make it float64)
    same = all(_detection_rows(d) for d in dets) and all(type(n) in (int, float) for _, w, h in labels for n in (w, h))
    files = _label_lines(np.concatenate(dets), labels, rows, score) if same else None
    if files is None:
        files = [yolo_label_text(d, w, h, score).encode() for d, w, h in labels]
    return files


def _detection_rows(d: np.ndarray) -> bool:
    """Whether `d` is float32 detection rows [N, 6], which the NumPy way takes."""
    return d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 6


def _label_lines(d: np.ndarray, labels: list[tuple[np.ndarray, int, int]], rows: np.ndarray,
                 score: bool) -> list[bytes] | None:
    """yolo_label_files' NumPy way (None where it cannot be exact): the arithmetic of yolo_label_text, row by
    row the same float32 operations."""
    if not np.isfinite(d).all():
        return None
    width = np.repeat(np.array([w for _, w, _ in labels], np.float32), rows)
    height = np.repeat(np.array([h for _, _, h in labels], np.float32), rows)
    columns = [(d[:, 0] + d[:, 2]) / 2 / width, (d[:, 1] + d[:, 3]) / 2 / height, (d[:, 2] - d[:, 0]) / width,
               (d[:, 3] - d[:, 1]) / height]
    fields = [fixed_text.integers(d[:, 5].astype(np.int64))]
    for column, decimals in zip(columns + ([d[:, 4]] if score else []), [6, 6, 6, 6, 5]):
        fields += [fixed_text.text(" ", len(d)), fixed_text.fixed(column, decimals)]
    if any(field is None for field in fields):
        return None
    data, lengths = fixed_text.join(fields + [fixed_text.text("\n", len(d))])
    row_starts = np.concatenate([[0], np.cumsum(lengths)])              # [rows + 1] bytes before each row, then all
    bounds = row_starts[np.concatenate([[0], np.cumsum(rows)])].tolist()   # [images + 1] the same for each image
    return [data[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def json_text(records: list[tuple[str, np.ndarray]], class_names: list[str]) -> str:
    """The JSON objects (json_objects) of a batch's images ((name, detections) each), one a line, joined by
    ",\n": made at once by NumPy (utils.ops.fixed_text) when they can be made exactly so (float32 detections,
    finite, not negative, classes the names cover), else image by image."""
    records = [(name, np.asarray(d)) for name, d in records if len(d)]
    if not records:
        return ""
    rows = all(_detection_rows(det) for _, det in records)
    made = _json_lines(np.concatenate([det for _, det in records]), records, class_names) if rows else None
    return made if made is not None else ",\n".join(text for name, det in records
                                                     for text in json_objects(name, det, class_names))


def _json_lines(d: np.ndarray, records: list[tuple[str, np.ndarray]], class_names: list[str]) -> str | None:
    """json_text's NumPy way (None where it cannot be exact)."""
    if not np.isfinite(d).all():
        return None
    classes = d[:, 5].astype(np.int64)
    if classes.min() < 0 or classes.max() >= len(class_names):
        return None
    n = len(d)
    image = np.repeat(np.arange(len(records)), [len(det) for _, det in records])
    t = fixed_text.text
    fields = [t('{"image": ', n), fixed_text.strings([json.dumps(name) for name, _ in records], image),
              t(', "class": ', n), fixed_text.integers(classes),
              t(', "class_name": ', n), fixed_text.strings([json.dumps(c) for c in class_names], classes),
              t(', "score": ', n), fixed_text.fixed(d[:, 4], 5),
              t(', "box": [', n), fixed_text.fixed(d[:, 0], 2), t(", ", n), fixed_text.fixed(d[:, 1], 2),
              t(", ", n), fixed_text.fixed(d[:, 2], 2), t(", ", n), fixed_text.fixed(d[:, 3], 2), t("]},\n", n)]
    if any(field is None for field in fields):
        return None
    return fixed_text.join(fields)[0][:-2].decode("ascii")


JPEG_QUALITY = 95                         # OpenCV's default, so both ways of saving give files alike


def encode_jpegs(images: list[torch.Tensor]) -> list[np.ndarray]:
    """RGB uint8 [3,H,W] tensors -> each one's JPEG file bytes, encoded where the images are (nvJPEG on CUDA,
    in one batched call) and copied back to the host in one transfer."""
    from torchvision.io import encode_jpeg  # noqa: PLC0415 (torchvision loads only where images are encoded with it)

    if not images:
        return []
    encoded = encode_jpeg(images, quality=JPEG_QUALITY)
    data = torch.cat(encoded).cpu().numpy()
    return np.split(data, np.cumsum([len(e) for e in encoded[:-1]], dtype=np.int64))


def write_files(folder: Path, files: list[tuple[str, bytes | np.ndarray]]) -> None:
    """Files' bytes written into `folder` (resolved), each name a single safe component. A symlink in a file's
    place is refused, not followed (O_NOFOLLOW), so nothing lands outside the folder; a failure (full disk,
    unwritable folder) becomes an OutputError naming the file. Plain os calls: one open, write and close a file
    (pathlib's resolving costs a dozen system calls more, each a turn at the GIL for a writer thread)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for name, data in files:
        path = folder / name
        if path.name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        try:
            fd = os.open(path, flags, 0o644)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(path, exc.strerror or str(exc), exc.errno or errno.EIO) from exc


def write_images(folder: Path, images: list[tuple[str, np.ndarray]]) -> None:
    """BGR arrays encoded by OpenCV in the format of each name's suffix (JPEG at JPEG_QUALITY) and written into
    `folder` by write_files. OpenCV's encoder releases the GIL, so writer threads encode in parallel."""
    files = []
    for name, image in images:
        suffix = Path(name).suffix.lower() or ".jpg"
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if suffix in (".jpg", ".jpeg") else []
        try:
            ok, data = cv2.imencode(suffix, image, params)
        except cv2.error as exc:
            raise OutputError(folder / name, f"OpenCV could not encode the image ({exc.err or exc})") from exc
        if not ok:
            raise OutputError(folder / name, "OpenCV could not encode the image")
        files.append((name, data))
    write_files(folder, files)


def write_image(path: Path, image: np.ndarray) -> None:
    """One BGR array written as the image file `path` (write_images)."""
    write_images(path.parent, [(path.name, image)])


class UniqueStems:
    """Output stems for input names: safe, and distinct when two inputs share a stem (a.jpg, a.png -> a, a_png)."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        # pathlib's stem and suffix rule by string operations: this runs once per image on a folder's main loop
        dot = name.rfind(".")
        base_stem, suffix = (name[:dot], name[dot + 1:]) if 0 < dot < len(name) - 1 else (name, "")
        stem = safe_component(base_stem)
        if stem in self.used:
            stem = safe_component(f"{base_stem}_{suffix}") if suffix else stem
        base, n = stem, 2
        while stem in self.used:
            stem, n = f"{base}_{n}", n + 1
        self.used.add(stem)
        return stem


def class_folders(class_names: list[str]) -> list[str]:
    """One safe, distinct folder name per class ('a/b' and 'a_b' both become 'a_b': the second gets '_<index>')."""
    folders: list[str] = []
    for i, name in enumerate(class_names):
        folder = safe_component(name)
        folders.append(folder if folder not in folders else f"{folder}_{i}")
    return folders


def save_crops(out_dir: Path, stem: str, image: np.ndarray, detections: np.ndarray, class_names: list[str]) -> int:
    """Cut each box out into out_dir/<class>/<stem>_<i>.jpg (names made safe); returns how many were written."""
    h, w = image.shape[:2]
    folders = class_folders(class_names)
    written = 0
    for i, (x1, y1, x2, y2, _, cls) in enumerate(detections):
        x1, y1 = max(0, int(x1)), max(0, int(y1))
        x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if x2 <= x1 or y2 <= y1:
            continue
        folder = make_dir(inside(out_dir, folders[int(cls)]))
        write_image(inside(folder, safe_component(f"{stem}_{i}.jpg")), image[y1:y2, x1:x2])
        written += 1
    return written


def class_counts(detections: np.ndarray, class_names: list[str]) -> Counter:
    """Objects per class name; a class id the names do not cover (a malformed detection) under its number."""
    with np.errstate(invalid="ignore"):
        ids = detections[:, 5].astype(np.int64)
    known = (ids >= 0) & (ids < len(class_names))
    counts = np.bincount(ids[known], minlength=len(class_names))          # 4x np.unique's speed
    found = Counter({class_names[c]: n for c, n in enumerate(counts.tolist()) if n})
    if not known.all():
        found.update(str(c) for c in ids[~known].tolist())
    return found


def draw_fps(image: np.ndarray, fps: float, avoid: list[Rect] = ()) -> np.ndarray:
    """Write the measured frames per second, on a dark patch, in the corner that covers `avoid`
    (the boxes and labels drawn) least."""
    scale = max(0.5, image.shape[0] / 720)
    thick = max(1, int(2 * scale))
    text = f"FPS {fps:.1f}"
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = 3
    x, y = free_corner((tw + 2 * pad, th + base + 2 * pad), (image.shape[1], image.shape[0]), list(avoid))
    x, y = int(x), int(y)
    cv2.rectangle(image, (x, y), (x + tw + 2 * pad, y + th + base + 2 * pad), (0, 0, 0), -1)
    cv2.putText(image, text, (x + pad, y + pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 255, 0), thick, cv2.LINE_AA)
    return image


class BackgroundWrites:
    """Runs write jobs on a few threads (OpenCV's encoders release the GIL), so saving keeps pace with inference.

    At most `window` jobs are pending (memory stays bounded); a job's error is raised on the caller's thread,
    at a later submit or at `finish`. threads 0: every job runs at once on the caller's thread. Several
    threads may submit.
    """

    def __init__(self, threads: int | None = None, window: int | None = None, name: str = "writer"):
        threads = min(8, os.cpu_count() or 1) if threads is None else threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads else None
        self.window = window or 8 * max(threads, 1)
        self.pending: deque[Future] = deque()
        self.lock = threading.Lock()

    def submit(self, job: Callable, *args) -> None:
        if self.pool is None:
            job(*args)
            return
        with self.lock:
            while self.pending and (self.pending[0].done() or len(self.pending) >= self.window):
                self.pending.popleft().result()
            self.pending.append(self.pool.submit(job, *args))

    def finish(self) -> None:
        """Wait for every job; the first failure is raised (the jobs not started are dropped)."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

"""Records (image path, xyxy pixel boxes, labels) and what every format's loader shares: reports, clipping, images."""
from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.log import get_logger

log = get_logger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
# What PIL may raise on a truncated, corrupt or hostile header.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Largest image read, in pixels: OpenCV's own decoding limit (CV_IO_MAX_IMAGE_PIXELS), so every image
# under it decodes in training as it does in predict.py; PIL's lower decompression-bomb limit does not apply
# because PIL only reads headers here.
MAX_IMAGE_PIXELS = 1 << 30
# The fallback of each default split name when its file is missing; any other name must exist.
DEFAULT_FALLBACKS = {"train": "trainval", "val": "test", "test": "val"}
_PIL_LIMIT_LOCK = threading.Lock()


class DatasetError(ValueError):
    """A mistake in the user's data or flags; the message is one line saying what to fix."""


class ImageReadError(DatasetError):
    """An image file that cannot be decoded."""


@dataclass
class Record:
    """One annotated image; boxes are xyxy pixels in the decoded image."""

    image_path: str
    boxes: np.ndarray  # float32 [N,4] x1,y1,x2,y2
    labels: np.ndarray  # int64 [N]
    difficult: np.ndarray  # bool [N]
    height: int
    width: int
    image_id: str  # unique in its split: the file's path under its image folder, without the extension
    file_name: str = ""  # the image file's path relative to its image folder or data root (COCO file_name)


@dataclass
class LoadReport:
    """What a loader skipped or dropped, for callers and tests."""

    split: str = ""
    split_file: Path | None = None  # the split list, data.yaml or instances json that named the images
    num_ids: int = 0
    num_records: int = 0
    unknown: Counter = field(default_factory=Counter)  # class name -> skipped objects
    missing_images: list[str] = field(default_factory=list)  # image ids
    corrupt_images: list[str] = field(default_factory=list)  # image paths
    degenerate_boxes: int = 0
    duplicate_ids: int = 0
    large_images: list[tuple[str, int, int]] = field(default_factory=list)  # (path, width, height)
    rescaled_images: int = 0  # XML <size> differs from the image in the same ratio: boxes rescaled
    size_mismatches: int = 0  # XML <size> differs otherwise (another ratio, or no sign of a resize): kept, clipped
    fallback_from: str | None = None  # the split asked for when its fallback was read instead
    missing_files: list[str] = field(default_factory=list)  # YOLO / COCO: listed image paths with no file
    missing_labels: int = 0  # YOLO: images without a label file, read as images without objects
    orphan_annotations: int = 0  # COCO: annotations of an image id the json does not list

    def warnings(self, root: Path) -> list[str]:
        """One line per category of skipped data."""
        lines = []
        if self.duplicate_ids:
            lines.append(f"warning: ignored {self.duplicate_ids} repeated ids in {self.split_file}")
        if self.unknown:
            n = sum(self.unknown.values())
            per = ", ".join(f"{k}: {v}" for k, v in sorted(self.unknown.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"warning: skipped {n} objects of {len(self.unknown)} unknown classes in {root} "
                         f"({per}); pass --classes to include them")
        if self.degenerate_boxes:
            lines.append(f"warning: dropped {self.degenerate_boxes} boxes under 1 px (after clipping to the "
                         f"image) in {root}")
        if self.missing_images:
            first = self.missing_images[0]
            lines.append(f"warning: skipped {len(self.missing_images)} ids with no image in "
                         f"{root / 'JPEGImages'} (first: {first}, looked for {first}.jpg/.jpeg/.png/.bmp)")
        if self.missing_files:
            lines.append(f"warning: skipped {len(self.missing_files)} images named in {self.split_file} that do not "
                         f"exist (first: {self.missing_files[0]})")
        if self.missing_labels:
            lines.append(f"warning: {self.missing_labels} images of {self.split_file} have no label file in the "
                         f"sibling labels/ folder; read as images without objects")
        if self.orphan_annotations:
            lines.append(f"warning: ignored {self.orphan_annotations} annotations in {self.split_file} whose "
                         f"image_id is not among its images")
        if self.corrupt_images:
            lines.append(f"warning: skipped {len(self.corrupt_images)} unreadable or corrupt images "
                         f"(first: {self.corrupt_images[0]})")
        if self.large_images:
            path, w, h = self.large_images[0]
            lines.append(f"warning: skipped {len(self.large_images)} images over the {MAX_IMAGE_PIXELS / 1e6:.0f}"
                         f"-megapixel limit (first: {path}, {w}x{h} = {w * h / 1e6:.0f} megapixels); "
                         f"resize them below it")
        if self.rescaled_images:
            lines.append(f"warning: rescaled the boxes of {self.rescaled_images} images in {root} to their image "
                         f"files: the annotation <size> is the image at another scale and the boxes reach past "
                         f"the file's edge (the image was resized after labelling)")
        return lines

    def notes(self, root: Path) -> list[str]:
        """Informational lines: what was read as it is but may deserve a look."""
        if not self.size_mismatches:
            return []
        return [f"{self.size_mismatches} annotations in {root} give an image size (VOC <size>, COCO width/height) "
                f"other than their image file's; their boxes were kept in the file's pixels and clipped to it"]


def read_class_names(path: str | Path) -> list[str]:
    """Read one class name per line, ignoring blank lines and surrounding spaces."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"class names file {path} not found; pass an existing file to --classes") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read class names file {path} ({e}); it must be UTF-8 text") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    check_class_names(names, str(path))
    return names


def check_class_names(names: list[str], source: str) -> None:
    if not names:
        raise DatasetError(f"no class names in {source}; write one class name per line")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise DatasetError(f"duplicate class names in {source}: {', '.join(dup)}; list each class once")


def default_fallback(split: str) -> str | None:
    """The split read instead of `split` when its file is missing: only for the default names."""
    return DEFAULT_FALLBACKS.get(split)


def _open_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the header only; None when PIL cannot identify the file."""
    try:
        try:
            w, h = _open_size(path)
        except Image.DecompressionBombError:
            # Only the header is read, so PIL's limit guards nothing; MAX_IMAGE_PIXELS is checked by the caller.
            # The lock keeps threads from restoring each other's limit out of order.
            with _PIL_LIMIT_LOCK:
                limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    w, h = _open_size(path)
                finally:
                    Image.MAX_IMAGE_PIXELS = limit
    except _PIL_ERRORS:
        return None
    return (w, h) if w > 0 and h > 0 else None


def make_record(image_path: str, names: list[str], boxes: np.ndarray, difficult: np.ndarray, size: tuple[int, int],
                image_id: str, file_name: str, index: dict[str, int], report: LoadReport) -> Record:
    """A Record from raw xyxy pixel boxes named by class: unknown classes skipped, boxes clipped, degenerate dropped."""
    w, h = size
    keep = np.array([n in index for n in names], bool).reshape(-1)
    report.unknown.update(n for n in names if n not in index)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[keep].copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    # Reversed corners end up with negative size here and are dropped too.
    ok = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    report.degenerate_boxes += int((~ok).sum())
    labels = np.array([index[n] for n in names if n in index], np.int64).reshape(-1)
    return Record(image_path, boxes[ok], labels[ok], np.asarray(difficult, bool).reshape(-1)[keep][ok], h, w,
                  image_id, file_name)


def log_report(report: LoadReport, records: list[Record], root: Path) -> None:
    """Count the records and log the report's warnings (one line per category) and notes."""
    report.num_records = len(records)
    for line in report.warnings(root):
        log.warning(line.removeprefix("warning: "))
    for line in report.notes(root):
        log.info(line)


def readable_size(path: str, report: LoadReport) -> tuple[int, int] | None:
    """(width, height) of an image file to load; None (counted in the report) when unreadable or too large."""
    return usable_size(path, image_size(path), report)


def usable_size(path: str, size: tuple[int, int] | None, report: LoadReport) -> tuple[int, int] | None:
    """`size` (an image's header size, None when unreadable) when the image can be loaded; otherwise counted, None."""
    if size is None:
        report.corrupt_images.append(path)
    elif size[0] * size[1] > MAX_IMAGE_PIXELS:
        report.large_images.append((path, *size))
        return None
    return size


def class_index(found: list[str], class_names: list[str] | None) -> tuple[list[str], dict[str, int]]:
    """(class names, name -> label): the given names when there are any (checked), else the names the data defines."""
    names = list(class_names) if class_names is not None else list(found)
    check_class_names(names, "the given class names" if class_names is not None else "the data's class names")
    return names, {n: i for i, n in enumerate(names)}


def in_threads(fn, items: list, desc: str, unit: str) -> list:
    """fn over items on a few threads (file reads overlap on network disks), in order, with a progress bar."""
    chunks = [items[i:i + 256] for i in range(0, len(items), 256)]
    out: list = []
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(items), desc=desc, unit=unit, disable=None) as bar:
        for chunk in pool.map(lambda c: [fn(x) for x in c], chunks):
            out += chunk
            bar.update(len(chunk))
    return out


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file into BGR uint8 HxWx3, whatever its extension says."""
    try:
        data = np.fromfile(str(path), np.uint8)  # unlike cv2.imread, works with non-ASCII paths
        # Pixels as stored, not EXIF-rotated: PIL's header size and the annotation tools agree with that.
        image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    except OSError as e:
        raise ImageReadError(f"cannot read image {path} ({e.strerror or e}); replace or remove it") from None
    except cv2.error:  # its message spans several lines
        image = None
    if image is None:
        size = image_size(str(path))
        if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise ImageReadError(f"image {path} is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} megapixels), "
                                 f"over the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit; resize it below that")
        raise ImageReadError(f"cannot decode image {path} (corrupt or not an image); replace or remove it")
    return image

"""Records (image path, xyxy pixel boxes, labels), what every loader shares, and Pascal-VOC annotations -> Records."""
from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
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
# <size> in the XML and the image file "agree in ratio" within this share (one condition of rescaling the boxes).
SIZE_RATIO_TOLERANCE = 0.02
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


@dataclass
class _Parsed:
    """One annotation before class mapping and clipping."""

    image_id: str
    image_path: str | None  # None: no matching file in JPEGImages
    size: tuple[int, int] | None  # (width, height); None: PIL could not read the header
    xml_size: tuple[float, float] | None  # (width, height) from <size>; None when absent or not positive
    names: list[str]
    boxes: np.ndarray  # float32 [N,4], raw from the XML
    difficult: np.ndarray  # bool [N]


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
    _check_class_names(names, str(path))
    return names


def _check_class_names(names: list[str], source: str) -> None:
    if not names:
        raise DatasetError(f"no class names in {source}; write one class name per line")
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise DatasetError(f"duplicate class names in {source}: {', '.join(dup)}; list each class once")


def default_fallback(split: str) -> str | None:
    """The split read instead of `split` when its file is missing: only for the default names."""
    return DEFAULT_FALLBACKS.get(split)


def split_exists(root: str | Path, split: str) -> bool:
    """Whether ImageSets/Main/<split>.txt exists."""
    return (Path(root) / "ImageSets" / "Main" / f"{split}.txt").is_file()


def resolve_split(root: str | Path, split: str, fallback: str | None = None) -> tuple[str, Path]:
    """Return (split name, path) of ImageSets/Main/<split>.txt, else of the fallback split."""
    main = Path(root) / "ImageSets" / "Main"
    for name in (split, fallback):
        if name and (main / f"{name}.txt").is_file():
            return name, main / f"{name}.txt"
    wanted = f"{split}.txt" + (f" or {fallback}.txt" if fallback else "")
    if not main.is_dir():
        raise DatasetError(f"no split files: {main} does not exist; create {main / wanted.split()[0]} "
                           f"with one image id per line")
    # Plain splits first: VOC ships dozens of per-class files like aeroplane_train.txt.
    found = sorted((p.stem for p in main.glob("*.txt")), key=lambda s: ("_" in s, s))
    shown = ", ".join(found[:12]) + (f", ... ({len(found) - 12} more)" if len(found) > 12 else "")
    raise DatasetError(f"split file {wanted} not found in {main}; existing splits: {shown or 'none'}")


def _read_split(path: Path, report: LoadReport) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split file {path} ({e})") from None
    # First token only: VOC per-class files carry a second column (1/-1).
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DatasetError(f"split file {path} is empty; write one image id per line")
    unique = list(dict.fromkeys(ids))
    report.duplicate_ids = len(ids) - len(unique)
    return unique


def _listdir_lower(folder: Path) -> dict[str, str]:
    """Map lower-cased file name -> real name, so lookups need no stat per candidate."""
    with os.scandir(folder) as it:
        return {e.name.lower(): e.name for e in it}


def _find_image(image_id: str, filename: str, images: dict[str, str]) -> str | None:
    """Real name in JPEGImages of the image for image_id, or None."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    # The id wins over <filename>: copy-pasted XMLs often carry a stale <filename>.
    candidates = [f"{image_id}{ext}" for ext in IMAGE_EXTS] + [base]
    if base:
        candidates += [f"{os.path.splitext(base)[0]}{ext}" for ext in IMAGE_EXTS]
    for name in candidates:
        if name and name.lower() in images:
            return images[name.lower()]
    return None


def _open_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _image_size(path: str) -> tuple[int, int] | None:
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


def _flag(text: str | None) -> bool:
    text = (text or "").strip().lower()
    if not text:
        return False
    try:
        return float(text) != 0
    except ValueError:
        return text in ("true", "yes")


def _xml_size(root: ET.Element) -> tuple[float, float] | None:
    """(width, height) of <size>, or None when absent, not numeric or not positive (many tools write 0)."""
    try:
        w, h = (float(root.findtext(f"size/{k}") or "") for k in ("width", "height"))
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 and np.isfinite(w * h) else None


def _parse_xml(xml_path: Path) -> tuple[str, tuple[float, float] | None, list[str], np.ndarray, np.ndarray]:
    """Return (<filename>, <size>, names, boxes float32 [N,4], difficult bool [N]) of one annotation."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"malformed annotation {xml_path} ({e}); fix or regenerate the XML") from None
    except OSError as e:
        raise DatasetError(f"cannot read annotation {xml_path} ({e.strerror or e})") from None
    names, boxes, difficult = [], [], []
    # Direct children only: person-layout <part> elements nest their own <name>/<bndbox>.
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            if not name or box is None:
                raise ValueError("missing <name> or <bndbox>")
            boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (TypeError, ValueError):
            raise DatasetError(f"malformed annotation {xml_path}: object {i} needs <name> and a <bndbox> with "
                               f"numeric xmin, ymin, xmax, ymax") from None
        names.append(name)
        difficult.append(_flag(obj.findtext("difficult")))
    return (
        (root.findtext("filename") or "").strip(),
        _xml_size(root),
        names,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(difficult, bool),
    )


def _parse_one(image_id: str, ann_dir: Path, xmls: dict[str, str], img_dir: Path, images: dict[str, str]) -> _Parsed:
    filename, xml_size, names, boxes, difficult = _parse_xml(ann_dir / xmls[f"{image_id}.xml".lower()])
    name = _find_image(image_id, filename, images)
    path = str(img_dir / name) if name else None
    size = _image_size(path) if path else None
    return _Parsed(image_id, path, size, xml_size, names, boxes, difficult)


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist; pass --data pointing at a VOC folder "
                           f"(with Annotations/, JPEGImages/, ImageSets/Main/)")
    for sub in ("Annotations", "JPEGImages"):
        if (root / sub).is_dir():
            continue
        # Users often point at VOCdevkit/ instead of VOCdevkit/VOC2007/.
        inner = sorted(p for p in root.iterdir() if (p / sub).is_dir())
        hint = (f"; did you mean --data {inner[0]}?" if inner
                else "; a VOC folder holds Annotations/, JPEGImages/, ImageSets/Main/")
        raise DatasetError(f"{root} has no {sub}/ folder{hint}")


def _fit_to_image(boxes: np.ndarray, xml_size: tuple[float, float] | None, size: tuple[int, int],
                  report: LoadReport) -> np.ndarray:
    """Boxes in the image file's pixels: rescaled when they are evidently in the frame of another-scale <size>."""
    (xw, xh), (w, h) = xml_size or size, size
    if not len(boxes) or (abs(xw - w) < 1 and abs(xh - h) < 1):
        return boxes
    sx, sy = w / xw, h / xh
    # Evidence that the boxes were drawn on the <size> image: they reach past the file's edge but fit <size>.
    # Without it a stale <size> (common in copied XMLs) is as likely as a resize, so the boxes stay as written.
    past_file = bool((boxes[:, 2] > w + 1).any() or (boxes[:, 3] > h + 1).any())
    fit_xml = bool((boxes[:, 2] <= xw + 1).all() and (boxes[:, 3] <= xh + 1).all())
    if abs(sx / sy - 1) <= SIZE_RATIO_TOLERANCE and past_file and fit_xml:
        report.rescaled_images += 1
        return boxes * np.array([sx, sy, sx, sy], np.float32)
    report.size_mismatches += 1     # a crop, a rotation, a stale <size>: today's rule, clip to the file
    return boxes


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


def _to_record(p: _Parsed, index: dict[str, int], report: LoadReport) -> Record:
    keep = np.array([n in index for n in p.names], bool)
    fitted = p.boxes.copy()
    fitted[keep] = _fit_to_image(p.boxes[keep].copy(), p.xml_size, p.size, report)
    return make_record(p.image_path, p.names, fitted, p.difficult, p.size, p.image_id,
                       os.path.basename(p.image_path), index, report)


def load_voc(
    root: str | Path,
    split: str,
    class_names: list[str] | None = None,
    fallback: str | None = None,
    report: LoadReport | None = None,
) -> tuple[list[Record], list[str]]:
    """Load a VOC split as Records plus the class names their labels index; fills `report` if given."""
    root = Path(root)
    report = report if report is not None else LoadReport()
    _check_root(root)
    report.split, report.split_file = resolve_split(root, split, fallback)
    if report.split != split:
        report.fallback_from = split
        log.warning("no split %s.txt in %s; reading %s instead", split, report.split_file.parent,
                    report.split_file.name)
    ids = _read_split(report.split_file, report)
    report.num_ids = len(ids)

    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    xmls = _listdir_lower(ann_dir)
    missing = [i for i in ids if f"{i}.xml".lower() not in xmls]
    if missing:
        raise DatasetError(f"{len(missing)} ids in {report.split_file} have no annotation (first: "
                           f"{ann_dir / (missing[0] + '.xml')}); add the XML or remove the id from the split")
    images = _listdir_lower(img_dir)

    # A few threads overlap the file reads (network disks); more only fight over the GIL.
    # Chunks keep the per-future overhead off each of the ~17k small files.
    parsed: list[_Parsed] = in_threads(lambda i: _parse_one(i, ann_dir, xmls, img_dir, images), ids,
                                       f"reading {report.split}", "xml")

    if class_names is None and (root / "classes.txt").is_file():
        class_names = read_class_names(root / "classes.txt")
    elif class_names is None:
        class_names = sorted({n for p in parsed for n in p.names})
        if not class_names:
            raise DatasetError(f"no objects in the annotations of {report.split_file}; "
                               f"pass --classes or write {root / 'classes.txt'}")
    else:
        class_names = list(class_names)
        _check_class_names(class_names, "the given class names")

    index = {n: i for i, n in enumerate(class_names)}
    records = []
    for p in parsed:
        if p.image_path is None:
            report.missing_images.append(p.image_id)
        elif p.size is None:
            report.corrupt_images.append(p.image_path)
        elif p.size[0] * p.size[1] > MAX_IMAGE_PIXELS:
            report.large_images.append((p.image_path, *p.size))
        else:
            records.append(_to_record(p, index, report))
    log_report(report, records, root)
    if not records:
        raise DatasetError(f"no readable images for the {len(ids)} ids in {report.split_file}; "
                           f"put the images in {img_dir}")
    return records, class_names


def log_report(report: LoadReport, records: list[Record], root: Path) -> None:
    """Count the records and log the report's warnings (one line per category) and notes."""
    report.num_records = len(records)
    for line in report.warnings(root):
        log.warning(line.removeprefix("warning: "))
    for line in report.notes(root):
        log.info(line)


def readable_size(path: str, report: LoadReport) -> tuple[int, int] | None:
    """(width, height) of an image file to load; None (counted in the report) when unreadable or too large."""
    size = _image_size(path)
    if size is None:
        report.corrupt_images.append(path)
    elif size[0] * size[1] > MAX_IMAGE_PIXELS:
        report.large_images.append((path, *size))
        return None
    return size


def class_index(found: list[str], class_names: list[str] | None) -> tuple[list[str], dict[str, int]]:
    """(class names, name -> label): the given names when there are any (checked), else the names the data defines."""
    names = list(class_names) if class_names is not None else list(found)
    _check_class_names(names, "the given class names" if class_names is not None else "the data's class names")
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
        size = _image_size(str(path))
        if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise ImageReadError(f"image {path} is {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} megapixels), "
                                 f"over the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit; resize it below that")
        raise ImageReadError(f"cannot decode image {path} (corrupt or not an image); replace or remove it")
    return image

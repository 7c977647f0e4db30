"""YOLO txt datasets (an ultralytics-style data.yaml, labels in the sibling labels/ folders) -> Records."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from utils.data.dataset import (IMAGE_EXTS, DatasetError, LoadReport, Record, class_index, in_threads, log_report,
                                make_record, readable_size)
from utils.log import get_logger

log = get_logger(__name__)
SPLIT_KEYS = ("train", "val", "test")
# what a folder of a split holds: the extensions the VOC loader reads, plus the ones ultralytics lists often
IMAGE_SUFFIXES = set(IMAGE_EXTS) | {".webp", ".tif", ".tiff"}


@dataclass
class YoloData:
    """A parsed data.yaml: the root its paths are relative to, class names, and each split's entries as written."""

    yaml: Path
    root: Path
    names: list[str]
    splits: dict[str, list[str]]   # split -> image folders or list files (relative to root unless absolute)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> DatasetError:
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return DatasetError(f"malformed data file {path}{where}: {problem}; fix the YAML")


def _names(path: Path, raw) -> list[str]:
    """`names` as a list, or a dict {0: name, 1: name, ...} with keys 0..n-1."""
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            keys = []
        if keys != list(range(len(raw))):
            raise DatasetError(f"{path}: names as a mapping needs the keys 0..{len(raw) - 1}, got {list(raw)}")
        raw = [raw[k] if k in raw else raw[str(k)] for k in keys]
    if not isinstance(raw, list) or not raw or not all(isinstance(n, (str, int)) and str(n).strip() for n in raw):
        raise DatasetError(f"{path}: needs 'names', a list of class names or a mapping index -> name")
    return [str(n).strip() for n in raw]


def read_data_yaml(path: str | Path) -> YoloData:
    """Parse an ultralytics-style data.yaml; a malformed one is an error naming the file (and line)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read data file {path} ({exc})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a mapping with train/val/test and names, got {type(raw).__name__}")
    given = Path(str(raw.get("path") or ""))
    root = given if given.is_absolute() else path.parent / given
    if not root.is_dir() and given.is_dir():      # written relative to the working directory instead
        root = given
    splits = {}
    for key in SPLIT_KEYS:
        value = raw.get(key)
        entries = value if isinstance(value, list) else [value] if value else []
        if not all(isinstance(e, str) and e.strip() for e in entries):
            raise DatasetError(f"{path}: '{key}' must be a folder or list file (or a list of them), got {value!r}")
        if entries:
            splits[key] = [e.strip() for e in entries]
    if not splits:
        raise DatasetError(f"{path}: names no split; give train (and val, test) as image folders or list files")
    return YoloData(path, root, _names(path, raw.get("names")), splits)


def label_path(image: Path) -> Path:
    """images/x/a.jpg -> labels/x/a.txt (the last 'images' folder of the path); beside the image when there is none."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _list_file(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read image list {path} ({exc})") from None
    # relative entries ('./images/a.jpg', as ultralytics writes them) are relative to the list file's folder
    return [p if p.is_absolute() else path.parent / p for p in (Path(s.strip()) for s in lines if s.strip())]


def split_images(data: YoloData, split: str) -> list[Path]:
    """The image paths of a split, in order: folders searched recursively, list files read line by line."""
    images: list[Path] = []
    for entry in data.splits[split]:
        where = Path(entry) if Path(entry).is_absolute() else data.root / entry
        if not where.exists() and entry.startswith("../"):
            where = data.root / entry[3:]     # Roboflow's '../train/images' beside its data.yaml, as ultralytics reads it
        if where.is_dir():
            images += sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif where.is_file():
            images += _list_file(where)
        else:
            raise DatasetError(f"{data.yaml}: {split} entry {entry!r} is neither a folder nor a list file "
                               f"({where} does not exist)")
    return images


def _number(text: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"malformed label {path} line {line}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise DatasetError(f"malformed label {path} line {line}: {text!r} is not a finite number")
    return value


def parse_label(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices int64 [N], normalised cx, cy, w, h float64 [N,4]); polygon rows become their bounding box."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read label {path} ({exc})") from None
    classes, boxes = [], []
    for n, line in enumerate(lines, start=1):
        values = line.split()
        if not values:
            continue
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise DatasetError(f"malformed label {path} line {n}: expected 'class cx cy w h' (5 values) or a polygon "
                               f"'class x1 y1 x2 y2 x3 y3 ...', got {len(values)} values")
        numbers = [_number(v, path, n) for v in values]
        cls = numbers[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DatasetError(f"malformed label {path} line {n}: class {values[0]} is not one of the {num_classes} "
                               f"class indices 0..{num_classes - 1} of the data file's names")
        if len(values) == 5:
            boxes.append(numbers[1:])
        else:
            xy = np.asarray(numbers[1:]).reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            boxes.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        classes.append(int(cls))
    return np.asarray(classes, np.int64), np.asarray(boxes, np.float64).reshape(-1, 4)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:          # an image outside the root (an absolute entry of a list file)
        return path.as_posix()


def _read_one(image: Path, data: YoloData, report: LoadReport) -> tuple | None:
    """(size, classes, boxes cx cy w h, has a label file) of one image; None when missing or unreadable (counted)."""
    if not image.is_file():
        report.missing_files.append(str(image))     # list.append: safe from the loader's threads
        return None
    size = readable_size(str(image), report)
    if size is None:
        return None
    label = label_path(image)
    if not label.is_file():
        return size, np.zeros(0, np.int64), np.zeros((0, 4)), False
    return (size, *parse_label(label, len(data.names)), True)


def load_yolo(data: YoloData, split: str, class_names: list[str] | None = None, fallback: str | None = None,
              report: LoadReport | None = None) -> tuple[list[Record], list[str]]:
    """Load a split of a data.yaml as Records plus the class names their labels index; fills `report` if given."""
    report = report if report is not None else LoadReport()
    name = split if split in data.splits else fallback if fallback in data.splits else None
    if name is None:
        wanted = split + (f" or {fallback}" if fallback else "")
        raise DatasetError(f"split {wanted} not found in {data.yaml}; existing splits: {', '.join(data.splits)}")
    if name != split:
        report.fallback_from = split
        log.warning("no split %s in %s; reading %s instead", split, data.yaml, name)
    report.split, report.split_file = name, data.yaml
    listed = split_images(data, name)
    images = list(dict.fromkeys(listed))
    report.duplicate_ids, report.num_ids = len(listed) - len(images), len(images)
    if not images:
        raise DatasetError(f"{data.yaml}: split {name} ({', '.join(data.splits[name])}) holds no images")
    names, index = class_index(data.names, class_names)
    read = in_threads(lambda p: _read_one(p, data, report), images, f"reading {name}", "image")
    for skipped in (report.missing_files, report.corrupt_images, report.large_images):
        skipped.sort()          # filled from threads: the first one named must not depend on timing
    records = []
    for image, item in zip(images, read):
        if item is None:
            continue
        (w, h), classes, cxcywh, labelled = item
        report.missing_labels += not labelled
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1) * [w, h, w, h]
        file_name = _relative(image, data.root)
        records.append(make_record(str(image), [data.names[c] for c in classes], xyxy, np.zeros(len(classes), bool),
                                   (w, h), os.path.splitext(file_name)[0], file_name, index, report))
    log_report(report, records, data.root)
    if not records:
        raise DatasetError(f"no readable images among the {len(images)} of split {name} in {data.yaml}")
    return records, names

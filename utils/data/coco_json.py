"""COCO json datasets (instances_*.json: images, annotations with xywh boxes, categories) -> Records.

Categories become contiguous labels in the order of their ids, with their names kept; iscrowd boxes are
flagged like VOC's difficult objects, so evaluation ignores them as COCOeval does.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.data.dataset import (DatasetError, LoadReport, Record, class_index, in_threads, log_report, make_record,
                                readable_size)
from utils.log import get_logger

log = get_logger(__name__)
# other spellings of our split names (Roboflow exports 'valid')
ALIASES = {"valid": "val", "validation": "val"}


@dataclass
class CocoData:
    """Where the json files of a COCO dataset are: split name -> instances json; `single`: one file was named."""

    path: Path
    splits: dict[str, Path]
    single: bool


def find_coco(path: str | Path) -> CocoData:
    """A .json file (one split) or a folder with annotations/instances_<split>.json files."""
    path = Path(path)
    if path.is_file():
        return CocoData(path, {path.stem.removeprefix("instances_"): path}, True)
    files = sorted((path / "annotations").glob("instances_*.json"))
    if not files:
        raise DatasetError(f"{path} has no annotations/instances_*.json; pass a COCO json file or such a folder")
    return CocoData(path, {f.stem.removeprefix("instances_"): f for f in files}, False)


def _plain(name: str) -> str:
    """train2017 -> train, valid -> val: the split name of ours a COCO split name stands for."""
    base = re.sub(r"[-_]?\d{4}$", "", name.lower())
    return ALIASES.get(base, base)


def coco_split(data: CocoData, split: str) -> str | None:
    """The COCO split answering to `split` (its own name, or e.g. train2017 for train); one lone json answers all."""
    if data.single:
        return next(iter(data.splits))
    if split in data.splits:
        return split
    matches = [name for name in data.splits if _plain(name) == split]
    return matches[0] if len(matches) == 1 else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed COCO file {path} line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read COCO file {path} ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list) \
            or not isinstance(raw.get("categories"), list) or not isinstance(raw.get("annotations", []), list):
        raise DatasetError(f"{path}: not a COCO instances file (needs 'images', 'annotations' and 'categories' lists)")
    return raw


def _categories(path: Path, raw: list) -> dict[int, str]:
    """category id -> name, in id order."""
    cats: dict[int, str] = {}
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not str(c.get("name", "")).strip():
            raise DatasetError(f"{path}: category {i} needs an integer 'id' and a 'name', got {c!r}")
        if c["id"] in cats:
            raise DatasetError(f"{path}: category id {c['id']} is listed twice")
        cats[c["id"]] = str(c["name"]).strip()
    if not cats:
        raise DatasetError(f"{path}: lists no categories")
    return dict(sorted(cats.items()))


def _images(path: Path, raw: list) -> dict:
    """image id -> image entry, in the file's order."""
    images: dict = {}
    for i, im in enumerate(raw):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str) \
                or not im["file_name"].strip():
            raise DatasetError(f"{path}: image {i} needs an 'id' and a 'file_name', got {im!r}")
        if im["id"] in images:
            raise DatasetError(f"{path}: image id {im['id']!r} is listed twice")
        images[im["id"]] = im
    return images


def _objects(path: Path, raw: list, images: dict, cats: dict[int, str], report: LoadReport) -> dict:
    """image id -> [(category name, x1, y1, x2, y2, iscrowd)]."""
    objects: dict = {k: [] for k in images}
    for i, a in enumerate(raw):
        box = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) \
                or not np.isfinite(box).all():
            raise DatasetError(f"{path}: annotation {i} (id {a.get('id') if isinstance(a, dict) else None}) needs a "
                               f"'bbox' of 4 numbers x, y, width, height")
        if a.get("category_id") not in cats:
            raise DatasetError(f"{path}: annotation {i} (id {a.get('id')}) has category_id {a.get('category_id')!r}, "
                               f"which is not among the categories")
        if a.get("image_id") not in objects:
            report.orphan_annotations += 1
            continue
        x, y, w, h = (float(v) for v in box)
        objects[a["image_id"]].append((cats[a["category_id"]], x, y, x + w, y + h, bool(a.get("iscrowd", 0))))
    return objects


def image_folder(json_path: Path, split: str, file_names: list[str]) -> Path:
    """The folder the json's file_names are relative to: <root>/<split>, <root>/images/<split>, ... or beside it."""
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    candidates = list(dict.fromkeys([root / split, root / "images" / split, root / "images", root,
                                     json_path.parent / "images", json_path.parent]))
    for name in file_names[:20]:
        for folder in candidates:
            if (folder / name).is_file():
                return folder
    first = file_names[0] if file_names else "?"
    raise DatasetError(f"images of {json_path} not found: looked for {first} in "
                       f"{', '.join(str(c) for c in candidates)}")


def load_coco(data: CocoData, split: str, class_names: list[str] | None = None, fallback: str | None = None,
              report: LoadReport | None = None) -> tuple[list[Record], list[str]]:
    """Load a COCO split as Records plus the class names their labels index; fills `report` if given."""
    report = report if report is not None else LoadReport()
    name = coco_split(data, split) or (coco_split(data, fallback) if fallback else None)
    if name is None:
        wanted = split + (f" or {fallback}" if fallback else "")
        raise DatasetError(f"split {wanted} not found in {data.path / 'annotations'}; existing splits: "
                           f"{', '.join(data.splits)} (instances_<split>.json)")
    if not data.single and _plain(name) != split and name != split:
        report.fallback_from = split
        log.warning("no split %s in %s; reading %s instead", split, data.path / "annotations", name)
    path = data.splits[name]
    report.split, report.split_file = name, path
    raw = _read_json(path)
    cats = _categories(path, raw["categories"])
    images = _images(path, raw["images"])
    objects = _objects(path, raw.get("annotations", []), images, cats, report)
    report.num_ids = len(images)
    if not images:
        raise DatasetError(f"{path} lists no images")
    folder = image_folder(path, name, [im["file_name"] for im in images.values()])
    names, index = class_index(list(cats.values()), class_names)
    entries = list(images.values())
    sizes = in_threads(lambda im: readable_size(str(folder / im["file_name"]), report)
                       if (folder / im["file_name"]).is_file() else None, entries, f"reading {name}", "image")
    for skipped in (report.corrupt_images, report.large_images):
        skipped.sort()          # filled from threads: the first one named must not depend on timing
    records = []
    for im, size in zip(entries, sizes):
        image = folder / im["file_name"]
        if size is None:
            if not image.is_file():
                report.missing_files.append(str(image))
            continue
        if (im.get("width"), im.get("height")) != size and im.get("width") is not None:
            report.size_mismatches += 1
        objs = objects[im["id"]]
        boxes = np.asarray([o[1:5] for o in objs], np.float32).reshape(-1, 4)
        records.append(make_record(str(image), [o[0] for o in objs], boxes, np.asarray([o[5] for o in objs], bool),
                                   size, os.path.splitext(im["file_name"])[0], im["file_name"], index, report))
    log_report(report, records, path.parent)
    if not records:
        raise DatasetError(f"no readable images among the {len(images)} of {path} (in {folder})")
    return records, names

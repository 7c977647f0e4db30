"""Pascal-VOC annotations (Annotations/*.xml, JPEGImages/, ImageSets/Main/<split>.txt) -> Records."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.data.dataset import (IMAGE_EXTS, DatasetError, LoadReport, Record, check_class_names, image_size,
                                in_threads, log_report, make_record, read_class_names, usable_size)
from utils.log import get_logger

log = get_logger(__name__)
# <size> in the XML and the image file "agree in ratio" within this share (one condition of rescaling the boxes).
SIZE_RATIO_TOLERANCE = 0.02

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
    size = image_size(path) if path else None
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
        check_class_names(class_names, "the given class names")

    index = {n: i for i, n in enumerate(class_names)}
    records = []
    for p in parsed:
        if p.image_path is None:
            report.missing_images.append(p.image_id)
        elif usable_size(p.image_path, p.size, report) is not None:
            records.append(_to_record(p, index, report))
    log_report(report, records, root)
    if not records:
        raise DatasetError(f"no readable images for the {len(ids)} ids in {report.split_file}; "
                           f"put the images in {img_dir}")
    return records, class_names

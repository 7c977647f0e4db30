"""Built-in sample dataset: filled shapes on varied backgrounds, written in Pascal-VOC layout (and as YOLO txt or COCO json).

The class of an object is its shape; colours are random, so a detector has to learn shape.
Every image is drawn from its own numpy Generator seeded by (seed, index): the same arguments
always give byte-identical files, and changing the counts leaves lower-index images unchanged.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from utils.data.dataset import read_class_names
from utils.data.voc import load_voc

SAMPLE_CLASSES = ["circle", "square", "triangle", "star"]
GENERATOR_VERSION = 3  # bump whenever the pictures change, so old copies get regenerated
MARKER = ".generated"
DEFAULT_ROOT = "VOCdevkit/sample"
SPLITS = ("train", "val", "test")
DEFAULTS = dict(n_train=240, n_val=60, n_test=60, size=(320, 320), seed=0, vary_width=0.15)

# several objects per image give a small detector enough positives to learn from in a CPU demo
MIN_OBJECTS, MAX_OBJECTS = 2, 8
_SIZE_RANGE = (0.12, 0.4)  # object extent as a fraction of the shorter image side
_MAX_BOX_IOU = 0.3          # placements overlapping an earlier box more than this are rejected
_MAX_HIDDEN = 0.2           # ... as are placements covering more than this of an earlier shape
_SHIFT = 4                  # cv2 sub-pixel bits for polygon vertices


def _shape_points(cls: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """Polygon vertices (float [K,2]) of a square/triangle/star with circumradius r."""
    if cls == 1:  # square, tilted at most 15 degrees
        angles = np.deg2rad(45 + rng.uniform(-15, 15)) + np.arange(4) * np.pi / 2
        radii = np.full(4, r)
    elif cls == 2:  # equilateral triangle, any rotation
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r)
    else:  # five-pointed star
        angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.4, 0.5))
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)


def _shape_mask(cls: int, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random size/position for one shape of class cls; returns its filled bool mask."""
    h, w = hw
    side = min(h, w)
    d = side * np.exp(rng.uniform(np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])))  # log-uniform extent
    r = max(d / 2, 2.0)
    cx, cy = rng.uniform(r, w - 1 - r), rng.uniform(r, h - 1 - r)
    mask = np.zeros((h, w), np.uint8)
    if cls == 0:
        s = 1 << _SHIFT
        cv2.circle(mask, (round(cx * s), round(cy * s)), round(r * s), 1, -1, cv2.LINE_8, _SHIFT)
    else:
        pts = np.round(_shape_points(cls, cx, cy, r, rng) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """Pixel-edge box [x1, y1, x2, y2] (x2 = last column + 1) of a non-empty mask."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.int64)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
    return float(inter / (area(a) + area(b) - inter))


def _overlap(m: np.ndarray, box: np.ndarray, o: np.ndarray, obox: np.ndarray) -> int:
    """Pixels shared by two masks, counted inside the intersection of their boxes only (cheap)."""
    x1, y1 = max(box[0], obox[0]), max(box[1], obox[1])
    x2, y2 = min(box[2], obox[2]), min(box[3], obox[3])
    if x2 <= x1 or y2 <= y1:
        return 0
    return int(np.count_nonzero(m[y1:y2, x1:x2] & o[y1:y2, x1:x2]))


@functools.lru_cache(maxsize=4)
def _noise_side(n: int) -> np.ndarray:
    """Fixed square field of unit Gaussian noise; images use random crops (drawing fresh noise is slow)."""
    return np.random.default_rng(20240601).standard_normal((n, n), dtype=np.float32)


def _noise_field(hw: tuple[int, int]) -> np.ndarray:
    """Noise field at least twice the image side, in steps of 256 so few sizes exist."""
    return _noise_side(512 * -(-max(hw) // 256))


def _ramp(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Linear ramp in [0, 1] at a random angle, float32 [H, W]."""
    h, w = hw
    t = rng.uniform(0, 2 * np.pi)
    x = np.arange(w, dtype=np.float32) * np.float32(np.cos(t))
    y = np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(t))
    lo, hi = min(x[0], x[-1]) + min(y[0, 0], y[-1, 0]), max(x[0], x[-1]) + max(y[0, 0], y[-1, 0])
    return (x + y - lo) / np.float32(max(float(hi - lo), 1.0))


def _background(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random mix of gradient, low-frequency blobs, stripes/grid and clutter; float32 planar [3,H,W] (faster)."""
    h, w = hw
    c0, c1 = rng.uniform(0, 255, (2, 3, 1, 1)).astype(np.float32)
    img = _ramp(hw, rng) * (c1 - c0)  # in-place updates below: fresh big arrays cost page faults
    img += c0
    if rng.random() < 0.7:  # low-frequency colour blobs
        g = int(rng.integers(2, 7))
        a = rng.uniform(0.2, 0.7)
        blobs = cv2.resize(rng.uniform(0, 255, (g, g, 3)).astype(np.float32), (32, 32), interpolation=cv2.INTER_CUBIC)
        for k, plane in enumerate(cv2.split(blobs)):  # cubic to 32x32 then linear: smooth and cheap
            cv2.addWeighted(img[k], 1 - a, cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR), a, 0, img[k])
    if rng.random() < 0.4:  # sinusoidal stripes
        period = max(4.0, rng.uniform(6, 40) * min(h, w) / 320)  # >= 4 px: no aliasing on tiny images
        amp = (rng.uniform(10, 40) * rng.choice([-1, 1], 3)).astype(np.float32)[:, None, None]
        img += amp * np.sin(_ramp(hw, rng) * np.float32(max(h, w) * 2 * np.pi / period))
    if rng.random() < 0.25:  # grid lines
        step = int(rng.integers(max(h, w) // 12 + 2, max(h, w) // 4 + 3))
        color = rng.uniform(0, 255, (3, 1, 1)).astype(np.float32)
        img[:, ::step] = 0.5 * img[:, ::step] + 0.5 * color
        img[:, :, ::step] = 0.5 * img[:, :, ::step] + 0.5 * color
    if rng.random() < 0.5:  # distractor clutter: thin lines and small dots, far thinner than any object
        hwc = cv2.merge(list(np.clip(img, 0, 255).astype(np.uint8)))
        for _ in range(int(rng.integers(1, 8))):
            p, q = rng.integers(0, (w, h), (2, 2))
            thickness = int(rng.integers(1, 3))
            cv2.line(hwc, tuple(map(int, p)), tuple(map(int, q)), _rand_color(rng), thickness, cv2.LINE_AA)
        for _ in range(int(rng.integers(0, 15))):
            c = rng.integers(0, (w, h))
            cv2.circle(hwc, (int(c[0]), int(c[1])), int(rng.integers(1, 3)), _rand_color(rng), -1, cv2.LINE_AA)
        img = np.stack(cv2.split(hwc)).astype(np.float32)
    return img


def _rand_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """Random BGR colour as Python ints (what cv2 drawing wants)."""
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _object_color(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random colour far enough from the mean background colour under the object to be visible."""
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0, 255, 3).astype(np.float32)
        d = float(np.linalg.norm(c - bg))
        if d > best_d:
            best, best_d = c, d
        if d >= 110:
            break
    return best


def _image_size(index: int, size: tuple[int, int], seed: int, vary_width: float) -> tuple[int, int]:
    """(H, W) of image index: height fixed, width jittered by +-vary_width (even number of pixels)."""
    h, w = size
    if vary_width <= 0:
        return h, w
    rng = np.random.default_rng([seed, index, 1])
    return h, max(8, 2 * round(w * rng.uniform(1 - vary_width, 1 + vary_width) / 2))


def render_sample(index: int, size: tuple[int, int] = DEFAULTS["size"], seed: int = 0,
                  vary_width: float = DEFAULTS["vary_width"]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image `index` as (BGR uint8 [H,W,3], xyxy boxes int64 [N,4], labels int64 [N], visible masks bool [N,H,W])."""
    hw = _image_size(index, size, seed, vary_width)
    rng = np.random.default_rng([seed, index])
    img = _background(hw, rng)
    n = 0 if rng.random() < 0.05 else int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    masks: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(n):
        cls = int(rng.integers(len(SAMPLE_CLASSES)))
        for _attempt in range(30):
            m = _shape_mask(cls, hw, rng)
            box = _tight_box(m)
            if all(_box_iou(box, b) <= _MAX_BOX_IOU and _overlap(m, box, o, b) <= _MAX_HIDDEN * o.sum()
                   for o, b in zip(masks, boxes)):
                break
        else:
            continue  # no room left for this one
        x1, y1, x2, y2 = box
        crop, mc = img[:, y1:y2, x1:x2], m[y1:y2, x1:x2]
        color = _object_color(crop[:, mc].mean(1), rng)
        shade = (_ramp((y2 - y1, x2 - x1), rng) - 0.5) * np.float32(rng.uniform(0, 50))  # gentle, not flat
        crop[:, mc] = np.clip(color[:, None] + shade[mc], 0, 255)
        masks.append(m)
        boxes.append(box)
        labels.append(cls)
    sigma = rng.uniform(0, 10)
    if sigma > 2:
        y, x = rng.integers(0, _noise_field(hw).shape[0] - np.array(hw) + 1)
        img += np.float32(sigma) * _noise_field(hw)[y:y + hw[0], x:x + hw[1]]  # grey sensor-like noise
    np.clip(img, 0, 255, out=img)
    img = cv2.merge([cv2.convertScaleAbs(plane) for plane in img])  # rounds to nearest uint8
    # later shapes are drawn on top: an earlier object's box is the tight box of what stays visible
    visible, covered = [], np.zeros(hw, bool)
    for m in masks[::-1]:
        visible.insert(0, m & ~covered)
        covered |= m
    vis_boxes = np.array([_tight_box(m) for m in visible], np.int64).reshape(-1, 4)
    return img, vis_boxes, np.array(labels, np.int64), np.array(visible, bool).reshape(-1, *hw)


def _voc_xml(image_id: str, hw: tuple[int, int], boxes: np.ndarray, labels: np.ndarray) -> str:
    """Pascal-VOC annotation text for one image."""
    objs = "".join(
        f"\t<object>\n\t\t<name>{SAMPLE_CLASSES[c]}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n"
        f"\t\t</bndbox>\n\t</object>\n" for b, c in zip(boxes.tolist(), labels.tolist()))
    return (f"<annotation>\n\t<folder>sample</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>generated by utils/data/sample_data.py</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{hw[1]}</width>\n\t\t<height>{hw[0]}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{objs}</annotation>\n")


def _marker_text(n_train: int, n_val: int, n_test: int, size: tuple[int, int], seed: int, vary_width: float) -> str:
    """Content of the marker file: generator version + every argument that changes the files."""
    args = dict(n_train=n_train, n_val=n_val, n_test=n_test, size=[int(s) for s in size], seed=seed,
                vary_width=float(vary_width))
    return json.dumps({"version": GENERATOR_VERSION, "args": args}, sort_keys=True) + "\n"


_README = """Sample dataset: filled shapes ({classes}) on random backgrounds.
Generated by utils/data/sample_data.py (make_sample_dataset) -- do not edit; delete it to regenerate.
Arguments: {args}
Boxes are pixel-edge coordinates: xmin/ymin = first covered column/row (0-based), xmax/ymax = last + 1.
"""


def make_sample_dataset(root: str | os.PathLike, n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"],
                        n_test: int = DEFAULTS["n_test"], size: tuple[int, int] = DEFAULTS["size"],
                        seed: int = DEFAULTS["seed"], vary_width: float = DEFAULTS["vary_width"]) -> Path:
    """Write the sample dataset (VOC layout) under root and return root; the marker file is written last."""
    root = Path(root)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"sample_{i:06d}" for i in range(n_train + n_val + n_test)]
    for i, image_id in enumerate(ids):
        img, boxes, labels, _ = render_sample(i, size, seed, vary_width)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError(f"could not encode {image_id}.jpg")
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(buf.tobytes())
        (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, img.shape[:2], boxes, labels))
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    splits["trainval"] = splits["train"] + splits["val"]
    for name, members in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{x}\n" for x in members))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in SAMPLE_CLASSES))
    marker = _marker_text(n_train, n_val, n_test, size, seed, vary_width)
    (root / "README.txt").write_text(_README.format(classes=", ".join(SAMPLE_CLASSES), args=marker.strip()))
    (root / MARKER).write_text(marker)
    return root


def ensure_sample_dataset(root: str | os.PathLike = DEFAULT_ROOT, **kw) -> Path:
    """Return root, generating the sample dataset first unless a complete copy with the same arguments is there."""
    root = Path(root)
    args = {**DEFAULTS, **kw}
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sample dataset arguments {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    expected = _marker_text(**args)
    marker = root / MARKER
    if marker.is_file() and marker.read_text() == expected:
        return root
    if root.exists() and not marker.is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a generated sample dataset (no {MARKER}); "
                              f"refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_sample_dataset(tmp, **args)
    except BaseException:  # never leave a half-written copy behind (Ctrl-C included)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        if marker.is_file() and marker.read_text() == expected:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        root.rename(old)  # move the stale copy aside, then swap the new one in
    try:
        tmp.rename(root)
    except OSError:
        if not (marker.is_file() and marker.read_text() == expected):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost a race to an identical copy
    shutil.rmtree(old, ignore_errors=True)
    return root


def sample_as_yolo(voc_root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The VOC dataset at voc_root (with classes.txt) rewritten as YOLO txt under out; returns out/data.yaml."""
    voc_root, out = Path(voc_root), Path(out)
    names = read_class_names(voc_root / "classes.txt")
    for split in SPLITS:
        records, _ = load_voc(voc_root, split, names)
        for sub in ("images", "labels"):
            (out / sub / split).mkdir(parents=True, exist_ok=True)
        for r in records:
            shutil.copyfile(r.image_path, out / "images" / split / r.file_name)
            cxcy, wh = (r.boxes[:, :2] + r.boxes[:, 2:]) / 2, r.boxes[:, 2:] - r.boxes[:, :2]
            norm = np.concatenate([cxcy, wh], 1) / [r.width, r.height, r.width, r.height]
            lines = "".join(f"{c} " + " ".join(f"{v:.6f}" for v in row) + "\n" for c, row in zip(r.labels, norm))
            (out / "labels" / split / f"{Path(r.file_name).stem}.txt").write_text(lines)
    names_yaml = "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                   f"names:\n{names_yaml}")
    return out / "data.yaml"


def sample_as_coco(voc_root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The VOC dataset at voc_root rewritten as COCO json (out/annotations/instances_<split>.json, images in
    out/<split>/; difficult objects become iscrowd); returns out."""
    voc_root, out = Path(voc_root), Path(out)
    names = read_class_names(voc_root / "classes.txt")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        records, _ = load_voc(voc_root, split, names)
        (out / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i, r in enumerate(records, start=1):
            shutil.copyfile(r.image_path, out / split / r.file_name)
            images.append({"id": i, "file_name": r.file_name, "width": r.width, "height": r.height})
            for box, label, crowd in zip(r.boxes.tolist(), r.labels.tolist(), r.difficult.tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label + 1,
                                    "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(crowd)})
        categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(names)]
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return out

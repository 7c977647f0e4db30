"""Drawing detections and saving training curves."""
from __future__ import annotations

import colorsys
import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path(__file__).resolve().parents[2] / "model_data" / "DejaVuSans.ttf"


def class_color(index: int, num_classes: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class, evenly spaced in hue."""
    r, g, b = colorsys.hsv_to_rgb((index / max(num_classes, 1)) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=16)
def _palette_bgr(num_classes: int) -> list[tuple[int, int, int]]:
    return [class_color(i, num_classes)[::-1] for i in range(num_classes)]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), size)


Rect = tuple[float, float, float, float]          # x1, y1, x2, y2 in pixels


def label_origin(box: Rect, label_wh: tuple[float, float], image_wh: tuple[int, int]) -> tuple[float, float]:
    """Top-left corner of a box's label: above the box, inside its top when there is no room above (a box at
    the top edge), shifted left at the right edge; inside the image whenever the label fits in it.
    Every argument may also be arrays of many boxes (NumPy broadcasting)."""
    x1, y1 = box[0], box[1]
    (lw, lh), (w, h) = label_wh, image_wh
    y = np.where(y1 - lh >= 0, y1 - lh, np.maximum(y1, 0.0))
    y = np.maximum(0.0, np.minimum(y, h - lh))
    x = np.maximum(0.0, np.minimum(np.maximum(x1, 0.0), w - lw))
    return x, y


def _style(height: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label font size and line thickness for image sizes (int arrays)."""
    return np.maximum(10, (3e-2 * height + 0.5).astype(np.int64)), np.maximum(1, (width + height) // 600)


@lru_cache(maxsize=4096)
def _label_sprite(text: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A label as drawn once: its text's ink [h, w] (0..1, float32, 2 px margin) and (w, h).

    Rendered with the TrueType font once per text and size: a folder of images repeats the same few
    hundred labels ('RBC 0.87'), and a cached label is ~100x cheaper than rendering the text again.
    """
    font = _font(size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    ink = Image.new("L", (w, h), 0)
    ImageDraw.Draw(ink).text((2, 2 - top), text, fill=255, font=font)
    return np.asarray(ink, dtype=np.float32) / 255, (w, h)


@lru_cache(maxsize=4096)
def _label_patch(text: str, size: int, color_bgr: tuple[int, int, int]) -> np.ndarray:
    """The label's pixels [h, w, 3] (uint8 BGR): its colour, darkened to black where the text's ink is. The label
    is opaque, so drawing it is one copy of these cached pixels: no per-image arithmetic holding the GIL."""
    ink = _label_sprite(text, size)[0][:, :, None]
    return (np.asarray(color_bgr, np.float32) * (1 - ink)).astype(np.uint8)


@dataclass
class Labelled:
    """Detections of one or more images, as drawn: one row each."""

    boxes: np.ndarray          # [n, 4] x1, y1, x2, y2 (float64)
    image: np.ndarray          # [n] the image each belongs to
    image_wh: np.ndarray       # [n, 2] its image's width and height (int64)
    thickness: np.ndarray      # [n] its image's line thickness (int64)
    colors: np.ndarray         # [n, 3] uint8 BGR, the class colour
    patch: np.ndarray          # [n] int64: its label's pixels, an index into label_patches
    label_patches: list[np.ndarray]   # the labels' pixels [h, w, 3] uint8 BGR, one per distinct label
    label_wh: np.ndarray       # [n, 2] the label's width and height (int64)
    origins: np.ndarray        # [n, 2] the label's top-left corner (float64)


def score_cents(scores: np.ndarray) -> np.ndarray:
    """Each score rounded to hundredths as f"{score:.2f}" rounds it, in hundredths (int64); -1 where that takes
    Python's formatting (a score a hair from a rounding tie, negative or -0.0, huge or not finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        hundredths = np.asarray(scores, np.float64) * 100
        # -0.0 passes ">= 0" but formats as "-0.00": the sign bit decides
        plain = (np.isfinite(hundredths) & ~np.signbit(hundredths) & (hundredths < 1e9)
                 & (np.abs(hundredths - np.floor(hundredths) - 0.5) > 1e-6))
    return np.where(plain, np.floor(np.where(plain, hundredths, 0) + 0.5), -1).astype(np.int64)


def _distinct_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For int64 rows [n, k]: the first row of each distinct value, and each row's distinct value's number. Rows
    packed into one int64 each where their ranges allow (sorting those is ~10x faster than sorting rows)."""
    if not len(keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    low = keys.min(0)
    spans = [int(high) - int(lowest) + 1 for high, lowest in zip(keys.max(0).tolist(), low.tolist())]   # exact
    if math.prod(spans) < 2 ** 62:
        spans = np.asarray(spans, np.int64)
        packed = (keys - low) @ np.concatenate([np.cumprod(spans[::-1])[::-1][1:], [1]])
        _, first, which = np.unique(packed, return_index=True, return_inverse=True)
    else:
        _, first, which = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, which.reshape(-1)


def _labelled(detections: list[np.ndarray], class_names: list[str], sizes: list[tuple[int, int]]) -> Labelled:
    """Every detection's box, colour, label patch and label position, for images of sizes (h, w). The label text
    and patch are made once per distinct (class, score text, font size), not per box."""
    rows = np.concatenate([np.asarray(d, np.float64).reshape(-1, 6)[:, :6] for d in detections] or
                          [np.zeros((0, 6))])
    image = np.repeat(np.arange(len(sizes)), [len(d) for d in detections])
    image_wh = np.asarray(sizes, np.int64).reshape(-1, 2)[image][:, ::-1]
    font, thickness = _style(image_wh[:, 1], image_wh[:, 0])
    palette = _palette_bgr(len(class_names))
    cls = rows[:, 5].astype(np.int64)
    cents = score_cents(rows[:, 4])
    # a box whose score takes Python's formatting is its own key (its row number, below -1)
    keys = np.stack([cls, np.where(cents >= 0, cents, -2 - np.arange(len(rows))), font], 1)
    first, patch = _distinct_rows(keys)
    colors, label_patches = [], []
    for (c, hundredths, size), row in zip(keys[first].tolist(), first.tolist()):
        known = 0 <= c < len(class_names)
        color = palette[c] if known else class_color(c, len(class_names))[::-1]
        score = f"{hundredths // 100}.{hundredths % 100:02d}" if hundredths >= 0 else f"{rows[row, 4]:.2f}"
        label_patches.append(_label_patch(f"{class_names[c] if known else c} {score}", size, color))
        colors.append(color)
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)[patch]
    label_wh = np.asarray([p.shape[1::-1] for p in label_patches], np.int64).reshape(-1, 2)[patch]
    origins = np.stack(label_origin(rows[:, :4].T, label_wh.T, image_wh.T), 1)
    return Labelled(rows[:, :4], image, image_wh, thickness, colors, patch, label_patches, label_wh, origins)


def detection_rects(detections: np.ndarray, class_names: list[str], image_shape: tuple[int, ...]) -> list[Rect]:
    """Every box and every label rectangle draw_detections draws: what other text must not cover."""
    found = _labelled([detections], class_names, [image_shape[:2]])
    labels = np.concatenate([found.origins, found.origins + found.label_wh], 1)
    return [tuple(r) for r in found.boxes.tolist()] + [tuple(r) for r in labels.tolist()]


@dataclass
class Paints:
    """What drawing detections paints, in drawing order (a later paint covers an earlier one): opaque rectangles
    inside their image, each a solid colour or (label) the pixels of a patch."""

    image: np.ndarray                   # [P] the image painted
    rects: np.ndarray                   # [P, 4] x0, y0, x1, y1 (int64, x1 and y1 exclusive), not empty
    colors: np.ndarray                  # [P, 3] uint8 BGR: a solid paint's fill
    patch: np.ndarray                   # [P] int64: a label's pixels, an index into label_patches; -1 for a solid paint
    label_patches: list[np.ndarray]     # the distinct labels' pixels [h, w, 3] uint8 BGR
    offsets: np.ndarray                 # [P, 2] (sx, sy): the patch pixel at (x0, y0), a label clipped at an edge


def detection_paints(detections: list[np.ndarray], class_names: list[str], sizes: list[tuple[int, int]]) -> Paints:
    """What drawing the detections of images of sizes (h, w) paints: per box its outline (four bands of the
    image's line thickness inside the box, its last row and column included), then its label (the cached
    patch, clipped to the image). All boxes of all images at once, in NumPy; the labels' text is per box.

    The one geometry of a drawing: draw_detections paints these with NumPy on the host, draw_on_tensors
    (utils/ops/draw_tensors.py) with one scatter per batch on the images' device, pixel for pixel the same.
    """
    found = _labelled(detections, class_names, sizes)
    n, t = len(found.boxes), found.thickness
    corners = np.round(found.boxes).astype(np.int64)
    x0, y0 = corners[:, 0], corners[:, 1]
    x1, y1 = np.maximum(corners[:, 2], x0) + 1, np.maximum(corners[:, 3], y0) + 1     # exclusive
    label = np.round(found.origins).astype(np.int64)
    # per box: top, bottom, left, right band, label; each x0, y0, x1, y1
    rects = np.empty((n, 5, 4), np.int64)
    rects[:, :4] = np.stack([x0, y0, x1, y1], 1)[:, None]
    rects[:, 0, 3], rects[:, 1, 1], rects[:, 2, 2], rects[:, 3, 0] = y0 + t, y1 - t, x0 + t, x1 - t
    rects[:, 4, :2], rects[:, 4, 2:] = label, label + found.label_wh
    np.maximum(rects[..., :2], 0, out=rects[..., :2])
    np.minimum(rects[..., 2:], found.image_wh[:, None], out=rects[..., 2:])
    keep = ((rects[..., 0] < rects[..., 2]) & (rects[..., 1] < rects[..., 3])).reshape(-1)
    offsets = np.zeros((n, 5, 2), np.int64)
    offsets[:, 4] = rects[:, 4, :2] - label
    patch = np.full((n, 5), -1, np.int64)
    patch[:, 4] = found.patch
    return Paints(np.repeat(found.image, 5)[keep], rects.reshape(-1, 4)[keep], np.repeat(found.colors, 5, 0)[keep],
                  patch.reshape(-1)[keep], found.label_patches, offsets.reshape(-1, 2)[keep])


def draw_detections(image_bgr: np.ndarray, detections: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Boxes, class names and scores drawn on a copy of a BGR image; label size follows the image size.

    detection_paints' rectangles copied into the array with NumPy: cached label patches, no conversion to a PIL
    image and back. predict.py draws on a thread of its own beside its main loop (bench/save_pipeline.py measures
    both), or on the GPU when the images were decoded there.
    """
    image = image_bgr.copy()
    paints = detection_paints([detections], class_names, [image.shape[:2]])
    # colours as uint8 rows: NumPy fills a slice from them faster than from Python ints
    for (x0, y0, x1, y1), color, patch, (sx, sy) in zip(paints.rects.tolist(), paints.colors, paints.patch.tolist(),
                                                          paints.offsets.tolist()):
        image[y0:y1, x0:x1] = color if patch < 0 else paints.label_patches[patch][sy:sy + y1 - y0, sx:sx + x1 - x0]
    return image


def overlap(a: Rect, b: Rect) -> float:
    """Area shared by two rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def free_corner(size: tuple[float, float], image_wh: tuple[int, int], avoid: list[Rect],
                margin: float = 4) -> tuple[float, float]:
    """Top-left of a `size` (w, h) rectangle in the image corner it overlaps `avoid` least
    (top-left, top-right, bottom-left, bottom-right first on a tie)."""
    (tw, th), (w, h) = size, image_wh
    xs, ys = (margin, max(margin, w - tw - margin)), (margin, max(margin, h - th - margin))
    corners = [(xs[0], ys[0]), (xs[1], ys[0]), (xs[0], ys[1]), (xs[1], ys[1])]
    return min(corners, key=lambda c: sum(overlap((c[0], c[1], c[0] + tw, c[1] + th), r) for r in avoid))


def read_results(path: str | Path) -> list[dict]:
    """Rows of a run's results.csv."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_plotting():
    """matplotlib.pyplot on the Agg backend, imported on demand (predict/get_map never need it; its import takes
    about half a second, which a training run pays on a background thread while it trains)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def plot_results(results_csv: str | Path, out_dir: str | Path) -> None:
    """loss.png (train losses per epoch) and map.png (mAP50, mAP50-95) beside results.csv."""
    plt = load_plotting()
    rows = read_results(results_csv)
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "box_loss", "obj_loss", "cls_loss"):
        ax.plot(epochs, [float(r[key]) for r in rows], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    evaluated = [r for r in rows if r["mAP50"] not in ("", "nan")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("mAP50", "mAP50-95"):
        ax.plot([int(r["epoch"]) for r in evaluated], [float(r[key]) for r in evaluated], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation mAP")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "map.png", dpi=100)
    plt.close(fig)

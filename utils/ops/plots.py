"""Drawing detections and saving training curves."""
from __future__ import annotations

import colorsys
import csv
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
    the top edge), shifted left at the right edge; inside the image whenever the label fits in it."""
    x1, y1 = box[0], box[1]
    (lw, lh), (w, h) = label_wh, image_wh
    y = y1 - lh if y1 - lh >= 0 else max(y1, 0.0)
    y = max(0.0, min(y, h - lh))
    x = max(0.0, min(max(x1, 0.0), w - lw))
    return x, y


def _style(height: int, width: int) -> tuple[int, int]:
    """Label font size and line thickness for an image size."""
    return max(10, int(3e-2 * height + 0.5)), max(1, (width + height) // 600)


@lru_cache(maxsize=4096)
def _label_sprite(text: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A label as drawn once: its text's ink [h, w] (0..1, float32, 2 px margin) and (w, h) as Python ints
    (the per-box arithmetic of label_origin is several times slower on NumPy scalars).

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


def _labels(detections: np.ndarray, class_names: list[str], size: int,
            image_wh: tuple[int, int]) -> list[tuple[list[float], str, Rect]]:
    """Per detection: its row as Python floats (x1, y1, x2, y2, score, class), its label's text and the
    label rectangle in the image."""
    out = []
    for row in np.asarray(detections, np.float64)[:, :6].tolist():     # Python floats: fast to format and round
        x1, y1, x2, y2, score, cls = row
        cls = int(cls)
        text = f"{class_names[cls] if 0 <= cls < len(class_names) else cls} {score:.2f}"
        lw, lh = _label_sprite(text, size)[1]
        lx, ly = label_origin((x1, y1, x2, y2), (lw, lh), image_wh)
        out.append((row, text, (lx, ly, lx + lw, ly + lh)))
    return out


def detection_rects(detections: np.ndarray, class_names: list[str], image_shape: tuple[int, ...]) -> list[Rect]:
    """Every box and every label rectangle draw_detections draws: what other text must not cover."""
    h, w = image_shape[:2]
    labels = _labels(detections, class_names, _style(h, w)[0], (w, h))
    return [tuple(row[:4]) for row, _, _ in labels] + [rect for _, _, rect in labels]


def draw_detections(image_bgr: np.ndarray, detections: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Boxes, class names and scores drawn on a copy of a BGR image; label size follows the image size.

    Boxes by OpenCV and labels from cached sprites, on the BGR array itself: no conversion to a PIL image and
    back. predict.py draws on a thread of its own beside its main loop (bench/save_pipeline.py measures both).
    """
    import cv2  # noqa: PLC0415 (ops stay importable without OpenCV's start-up)

    image = image_bgr.copy()
    h, w = image.shape[:2]
    size, thickness = _style(h, w)
    palette = _palette_bgr(len(class_names))
    inset = (thickness - 1) / 2
    for (x1, y1, x2, y2, _, cls), text, (lx, ly, _, _) in _labels(detections, class_names, size, (w, h)):
        cls = int(cls)
        color = palette[cls] if 0 <= cls < len(palette) else class_color(cls, len(class_names))[::-1]   # BGR
        # the outline inside the box, as a line of `thickness` pixels from its corners inwards
        cv2.rectangle(image, (round(x1 + inset), round(y1 + inset)), (round(x2 - inset), round(y2 - inset)), color,
                      thickness)
        x0, y0 = round(lx), round(ly)
        ix0, iy0 = max(0, -x0), max(0, -y0)                       # the part of the label inside the image
        x0, y0 = max(x0, 0), max(y0, 0)
        label = _label_patch(text, size, color)
        patch = image[y0:y0 + label.shape[0] - iy0, x0:x0 + label.shape[1] - ix0]
        patch[:] = label[iy0:iy0 + patch.shape[0], ix0:ix0 + patch.shape[1]]
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

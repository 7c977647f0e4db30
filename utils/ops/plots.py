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


def _style(height: int, width: int) -> tuple[ImageFont.FreeTypeFont, int]:
    """Label font and line thickness for an image size."""
    return _font(max(10, int(3e-2 * height + 0.5))), max(1, (width + height) // 600)


def _labels(detections: np.ndarray, class_names: list[str], font: ImageFont.FreeTypeFont,
            image_wh: tuple[int, int]) -> list[tuple[str, Rect, int]]:
    """Per detection: its label text, the label rectangle, and the text's top offset."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = []
    for x1, y1, x2, y2, score, cls in detections:
        cls = int(cls)
        label = f"{class_names[cls] if 0 <= cls < len(class_names) else cls} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        lw, lh = right - left + 4, bottom - top + 4
        lx, ly = label_origin((x1, y1, x2, y2), (lw, lh), image_wh)
        out.append((label, (lx, ly, lx + lw, ly + lh), top))
    return out


def detection_rects(detections: np.ndarray, class_names: list[str], image_shape: tuple[int, ...]) -> list[Rect]:
    """Every box and every label rectangle draw_detections draws: what other text must not cover."""
    h, w = image_shape[:2]
    labels = _labels(detections, class_names, _style(h, w)[0], (w, h))
    return [tuple(map(float, d[:4])) for d in detections] + [rect for _, rect, _ in labels]


def draw_detections(image_bgr: np.ndarray, detections: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Boxes, class names and scores drawn on a copy of a BGR image; label size follows the image size."""
    image = Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    h, w = image_bgr.shape[:2]
    font, thickness = _style(h, w)
    draw = ImageDraw.Draw(image)
    for (x1, y1, x2, y2, _, cls), (label, (lx, ly, lx2, ly2), top) in zip(
            detections, _labels(detections, class_names, font, (w, h))):
        color = class_color(int(cls), len(class_names))
        draw.rectangle([x1, y1, x2, y2], outline=color, width=thickness)
        draw.rectangle([lx, ly, lx2, ly2], fill=color)
        draw.text((lx + 2, ly + 2 - top), label, fill=(0, 0, 0), font=font)
    return np.asarray(image)[:, :, ::-1].copy()


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


def plot_results(results_csv: str | Path, out_dir: str | Path) -> None:
    """loss.png (train losses per epoch) and map.png (mAP50, mAP50-95) beside results.csv."""
    import matplotlib  # noqa: PLC0415  (imported on demand: predict/get_map never need it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

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

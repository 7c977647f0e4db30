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


def draw_detections(image_bgr: np.ndarray, detections: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Boxes, class names and scores drawn on a copy of a BGR image; label size follows the image size."""
    image = Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    h, w = image_bgr.shape[:2]
    font = _font(max(10, int(3e-2 * h + 0.5)))
    thickness = max(1, (w + h) // 600)
    draw = ImageDraw.Draw(image)
    for x1, y1, x2, y2, score, cls in detections:
        cls = int(cls)
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        color = class_color(cls, len(class_names))
        draw.rectangle([x1, y1, x2, y2], outline=color, width=thickness)
        label = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1 + 1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=color)
        draw.text((x1 + 2, ty + 2 - top), label, fill=(0, 0, 0), font=font)
    return np.asarray(image)[:, :, ::-1].copy()


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

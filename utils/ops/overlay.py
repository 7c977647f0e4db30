"""Pictures of maps over images: per-map min-max colours with a colour bar in absolute values, gate bar charts.

Every spatial map is scaled to its own minimum and maximum before colouring (a map after a short
training run spans a small absolute range, which a fixed 0-1 scale shows as one flat colour); the
colour bar's ticks give the absolute values, so two pictures are compared by their numbers.
"""
from __future__ import annotations

import textwrap
from typing import NamedTuple

import numpy as np

DPI = 100
CMAP = "jet"


class Panel(NamedTuple):
    """One picture of a figure: kind 'spatial' (data [h0,w0] over the image), 'channel' (data [C] gates)
    or 'text' (data a string); `scaled` marks a spatial map already in 0..1 (renormalised per box)."""

    kind: str
    title: str
    data: np.ndarray | str
    scaled: bool = False


def normalise_map(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max scaling to 0..1 -> (scaled float32, min, max); a flat map becomes all 0."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return np.zeros(values.shape, np.float32), lo, hi
    return ((values - lo) / (hi - lo)).astype(np.float32), lo, hi


def _pyplot():
    import matplotlib  # noqa: PLC0415  (on demand: plain prediction never draws figures)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _wrap(title: str, width_in: float) -> str:
    return "\n".join(textwrap.wrap(title, max(20, int(width_in * 10))))


def tick_labels(lo: float, hi: float, ticks: tuple[float, ...]) -> list[str]:
    """Absolute values at colour-bar positions (0..1 of lo..hi), with enough digits to tell them apart."""
    span = hi - lo
    digits = int(np.clip(np.ceil(-np.log10(span / 2)) + 2, 0, 12)) if span > 0 else 3
    big = max(abs(lo), abs(hi))
    if big >= 1e4 or (big < 1e-3 and digits > 6):
        return [f"{lo + t * span:.{max(2, int(np.log10(big / span + 1)) + 2)}e}" for t in ticks]
    return [f"{lo + t * span:.{digits}f}" for t in ticks]


def _spatial(fig, ax, image_rgb: np.ndarray, panel: Panel) -> None:
    """The image blended half and half with the map's colours, and a colour bar labelled in the map's values."""
    plt = _pyplot()
    if panel.scaled:
        shown, lo, hi = np.clip(panel.data, 0, 1).astype(np.float32), 0.0, 1.0
    else:
        shown, lo, hi = normalise_map(panel.data)
    cmap = plt.get_cmap(CMAP)
    blended = 0.5 * image_rgb.astype(np.float32) / 255 + 0.5 * cmap(shown)[..., :3]
    ax.imshow(blended.clip(0, 1))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=cmap), ax=ax, fraction=0.046, pad=0.02)
    ticks = (0.0, 0.5, 1.0)
    bar.set_ticks(ticks)
    bar.set_ticklabels(tick_labels(lo, hi, ticks) if hi > lo else ["", f"flat {lo:.4g}", ""])
    ax.set_axis_off()


def _channel(ax, panel: Panel) -> None:
    """Gates sorted from largest to smallest: how selective the block is across channels."""
    gates = np.sort(np.asarray(panel.data, dtype=np.float64).ravel())[::-1]
    ax.stairs(gates, np.arange(len(gates) + 1), fill=True, color="tab:blue")      # one artist, not C bars
    ax.set_xlim(0, len(gates))
    lo, hi = gates.min(), gates.max()
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
    ax.set_ylim(min(0.0, lo - pad), hi + pad)
    ax.set_xlabel(f"{len(gates)} channels, sorted")
    ax.text(0.98, 0.95, f"max {hi:.3g}\nmean {gates.mean():.3g}\nmin {lo:.3g}", transform=ax.transAxes,
            ha="right", va="top", fontsize=8, bbox=dict(facecolor="white", alpha=0.8, lw=0))


def _text(ax, panel: Panel) -> None:
    ax.text(0.5, 0.5, str(panel.data), ha="center", va="center", fontsize=10, wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def _figure_to_bgr(fig) -> np.ndarray:
    plt = _pyplot()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return np.ascontiguousarray(rgba[:, :, 2::-1])


def panels_figure(image_bgr: np.ndarray, rows: list[list[Panel]], row_titles: list[str] | None = None) -> np.ndarray:
    """A grid of panels (one row per list) drawn over the image -> a BGR picture."""
    plt = _pyplot()
    h, w = image_bgr.shape[:2]
    cols = max(len(r) for r in rows)
    cell_w = float(np.clip(w / DPI, 3.0, 6.0))
    cell_h = cell_w * h / w + 0.8
    fig, axes = plt.subplots(len(rows), cols, figsize=(cell_w * 1.25 * cols, cell_h * len(rows)), dpi=DPI,
                             squeeze=False)
    image_rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            panel = row[c]
            if panel.kind == "spatial":
                _spatial(fig, ax, image_rgb, panel)
            elif panel.kind == "channel":
                _channel(ax, panel)
            else:
                _text(ax, panel)
            title = f"{row_titles[r]}: {panel.title}" if row_titles and c == 0 else panel.title
            ax.set_title(_wrap(title, cell_w * 1.2), fontsize=9)
    fig.tight_layout()
    return _figure_to_bgr(fig)


def heatmap_figure(image_bgr: np.ndarray, panel: Panel) -> np.ndarray:
    """One spatial map over the image with its colour bar and title -> a BGR picture."""
    return panels_figure(image_bgr, [[panel]])

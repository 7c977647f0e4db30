"""Detections drawn on a batch of RGB image tensors where they are (the GPU, after device decoding), so that
predict.py can draw and encode a folder's images there and only write bytes on the host.

The rectangles are detection_paints' (utils/ops/plots.py), the one geometry of a drawing; here they become one
table (`plan_drawing`, host only) uploaded per batch and one scatter (`paint`, the device). Every pixel a paint
covers is generated on the device (repeat_interleave over the paints' areas); where paints overlap, the later
one wins (sorting the entries by pixel, then paint number, picks it), as when draw_detections paints them in
order. The result is pixel for pixel draw_detections' drawing, in RGB.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from utils.ops.plots import detection_paints


@dataclass
class DrawingPlan:
    """A batch's drawing as arrays, made on the host without touching the images' device."""

    sizes: list[tuple[int, int]]   # (h, w) per image
    pixel_start: np.ndarray        # [B+1] image b's pixel (y, x) is pixel_start[b] + y*w + x of the batch
    # per paint: its first pixel in the batch and in the canvas (the images' planes one after another), its
    # image's row length and plane size, its width and height, its first source pixel, the source's row and
    # column strides (0 and 0: a solid colour)
    table: np.ndarray              # [P, 9] int64, in drawing order
    sources_rgb: np.ndarray        # [S, 3] uint8: every solid paint's colour, then each label patch once


def plan_drawing(sizes: list[tuple[int, int]], detections: list[np.ndarray], class_names: list[str]) -> DrawingPlan:
    """What drawing the detections of images of sizes (h, w) paints, as one table."""
    areas = np.asarray([h * w for h, w in sizes], np.int64)
    pixel_start = np.concatenate([[0], np.cumsum(areas)]).astype(np.int64)
    paints = detection_paints(detections, class_names, sizes)
    solid = paints.patch < 0
    labels = np.flatnonzero(~solid)
    # each label patch drawn packed once a batch, after the solid colours
    drawn, which = np.unique(paints.patch[labels], return_inverse=True)
    which = which.reshape(-1)                                  # each label paint's place among the drawn patches
    unique = [paints.label_patches[i] for i in drawn.tolist()]
    hw = np.asarray([p.shape[:2] for p in unique], np.int64).reshape(-1, 2)
    unique_start = int(solid.sum()) + np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1])[:-1]]).astype(np.int64)
    widths = hw[which, 1]
    src_start = np.zeros(len(solid), np.int64)
    src_row = np.zeros(len(solid), np.int64)
    src_start[solid] = np.arange(int(solid.sum()))
    src_start[labels] = unique_start[which] + paints.offsets[labels, 1] * widths + paints.offsets[labels, 0]
    src_row[labels] = widths
    sources = [paints.colors[solid]] + [p.reshape(-1, 3) for p in unique]
    x0, y0, x1, y1 = paints.rects.T
    w = np.asarray([w for _, w in sizes], np.int64)[paints.image]
    first, offset = pixel_start[paints.image], y0 * w + x0
    table = np.stack([first + offset, 3 * first + offset, w, areas[paints.image], x1 - x0, y1 - y0, src_start,
                      src_row, (~solid).astype(np.int64)], 1).reshape(-1, 9)
    return DrawingPlan(list(sizes), pixel_start, table, np.concatenate(sources)[:, ::-1])


def paint(images: list[torch.Tensor], plan: DrawingPlan) -> list[torch.Tensor]:
    """Copies of RGB uint8 [3,H,W] images (all on one device) with the plan painted on them. No host
    synchronisation: every size comes from the plan."""
    if not len(plan.table):
        return [im.clone() for im in images]
    device = images[0].device
    table = plan.table
    counts = table[:, 4] * table[:, 5]
    total = int(counts.sum())
    canvas = torch.cat([im.reshape(-1) for im in images] + [images[0].new_zeros(3)])  # planar images, then a bin
    t = torch.from_numpy(table).to(device)
    src_pixels = torch.from_numpy(np.ascontiguousarray(plan.sources_rgb)).to(device)               # [S, 3]
    pixel0, canvas0, row_len, plane, width, _, src0, src_row, src_col = t.unbind(1)
    painted = torch.repeat_interleave(torch.arange(len(table), device=device), t[:, 4] * t[:, 5],
                                      output_size=total)                                          # [N]
    first = torch.from_numpy(np.cumsum(counts) - counts).to(device)
    local = torch.arange(total, device=device) - first[painted]
    r = torch.div(local, width[painted], rounding_mode="floor")
    c = local - r * width[painted]
    pixel = pixel0[painted] + r * row_len[painted] + c                                             # [N]
    # the last paint covering a pixel wins (paint numbers grow in drawing order): sorted by pixel, then paint,
    # a pixel's last entry is its winner. Memory grows with the pixels painted, not with the images' size.
    key = torch.sort(pixel * len(table) + painted).values
    wins = torch.ones_like(key, dtype=torch.bool)
    wins[:-1] = key[:-1] // len(table) != key[1:] // len(table)
    painted = key % len(table)
    pixel = key // len(table)
    r = torch.div(pixel - pixel0[painted], row_len[painted], rounding_mode="floor")
    c = pixel - pixel0[painted] - r * row_len[painted]
    spare = canvas.numel() - 3                            # the losers write into the 3 spare bytes instead
    at = torch.where(wins, canvas0[painted] + r * row_len[painted] + c, spare)
    at = at[None] + torch.where(at == spare, 0, plane[painted])[None] * torch.arange(3, device=device)[:, None]
    colour = src_pixels[src0[painted] + r * src_row[painted] + c * src_col[painted]].T              # [3, N]
    canvas.index_put_((at.reshape(-1),), colour.reshape(-1))
    starts = plan.pixel_start.tolist()
    return [canvas[3 * starts[b]:3 * starts[b + 1]].view(3, h, w) for b, (h, w) in enumerate(plan.sizes)]


def draw_on_tensors(images: list[torch.Tensor], detections: list[np.ndarray],
                    class_names: list[str]) -> list[torch.Tensor]:
    """Copies of RGB uint8 [3,H,W] images (all on one device) with their detections drawn on them."""
    if not images:
        return []
    return paint(images, plan_drawing([(int(im.shape[1]), int(im.shape[2])) for im in images], detections,
                                      class_names))

"""Detections drawn on a batch of RGB image tensors where they are (the GPU, after device decoding), so that
predict.py can draw and encode a folder's images there and only write bytes on the host.

The rectangles are detection_paints' (utils/ops/plots.py), the one geometry of a drawing; here they become one
table uploaded per batch and one scatter. Every pixel a paint covers is generated on the device (repeat_interleave
over the paints' areas); where paints overlap, the later one wins (a scatter-amax of paint numbers picks it), as
when draw_detections paints them in order. The result is pixel for pixel draw_detections' drawing, in RGB.
"""
from __future__ import annotations

import numpy as np
import torch

from utils.ops.plots import detection_paints

def draw_on_tensors(images: list[torch.Tensor], detections: list[np.ndarray],
                    class_names: list[str]) -> list[torch.Tensor]:
    """Copies of RGB uint8 [3,H,W] images (all on one device) with their detections drawn on them."""
    if not images:
        return []
    device = images[0].device
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    areas = np.asarray([h * w for h, w in sizes], np.int64)
    pixel_start = np.concatenate([[0], np.cumsum(areas)])   # image b's pixel (y, x): pixel_start[b] + y*w + x
    paints = detection_paints(detections, class_names, sizes)
    if not len(paints.image):
        return [im.clone() for im in images]
    # the sources: every solid paint's colour (one pixel, strides 0), then each label patch once (its pixels)
    solid = np.asarray([p is None for p in paints.patches])
    sources, patch_at, length = [paints.colors[solid]], {}, int(solid.sum())
    src_start = np.zeros(len(solid), np.int64)
    src_row = np.zeros(len(solid), np.int64)
    src_start[solid] = np.arange(length)
    for i in np.flatnonzero(~solid).tolist():
        patch = paints.patches[i]
        if id(patch) not in patch_at:
            patch_at[id(patch)] = length
            sources.append(patch.reshape(-1, 3))
            length += len(sources[-1])
        sx, sy = paints.offsets[i].tolist()
        src_start[i] = patch_at[id(patch)] + sy * patch.shape[1] + sx
        src_row[i] = patch.shape[1]
    # per paint: its first pixel in the winner index and in the canvas, its image's row length and plane size,
    # its width and height, its first source pixel, the source's row and column strides (0 and 0: a solid colour)
    x0, y0, x1, y1 = paints.rects.T
    w = np.asarray([w for _, w in sizes], np.int64)[paints.image]
    offset = y0 * w + x0
    table = np.stack([pixel_start[paints.image] + offset, 3 * pixel_start[paints.image] + offset, w,
                      areas[paints.image], x1 - x0, y1 - y0, src_start, src_row, (~solid).astype(np.int64)], 1)
    canvas = torch.cat([im.reshape(-1) for im in images] + [images[0].new_zeros(3)])  # planar images, then a bin
    _paint(canvas, int(pixel_start[-1]), table, np.concatenate(sources)[:, ::-1], device)
    return [canvas[3 * pixel_start[b]:3 * pixel_start[b + 1]].view(3, h, w) for b, (h, w) in enumerate(sizes)]


def _paint(canvas: torch.Tensor, pixels: int, table: np.ndarray, sources_rgb: np.ndarray,
           device: torch.device) -> None:
    """Scatter every paint of `table` into `canvas` (the images' planes, flat, then 3 spare bytes); `pixels` is
    the number of image pixels. No host synchronisation: the sizes come from the host table."""
    counts = table[:, 4] * table[:, 5]
    total = int(counts.sum())
    t = torch.from_numpy(table).to(device)
    src_pixels = torch.from_numpy(np.ascontiguousarray(sources_rgb)).to(device)   # [S, 3]
    pixel0, canvas0, row_len, plane, width, _, src0, src_row, src_col = t.unbind(1)
    paint = torch.repeat_interleave(torch.arange(len(table), device=device), t[:, 4] * t[:, 5],
                                    output_size=total)                                            # [N]
    first = torch.from_numpy(np.cumsum(counts) - counts).to(device)
    local = torch.arange(total, device=device) - first[paint]
    r = torch.div(local, width[paint], rounding_mode="floor")
    c = local - r * width[paint]
    pixel = pixel0[paint] + r * row_len[paint] + c                                                 # [N]
    # the last paint covering a pixel wins: paint numbers grow in drawing order
    order = paint.to(torch.int32)                          # int32: the winner index costs 4 bytes an image pixel
    winner = torch.full((pixels,), -1, dtype=torch.int32, device=device).scatter_reduce_(0, pixel, order, "amax")
    spare = canvas.numel() - 3                            # the losers write into the 3 spare bytes instead
    at = torch.where(winner[pixel] == order, canvas0[paint] + r * row_len[paint] + c, spare)
    at = at[None] + torch.where(at == spare, 0, plane[paint])[None] * torch.arange(3, device=device)[:, None]
    colour = src_pixels[src0[paint] + r * src_row[paint] + c * src_col[paint]].T                   # [3, N]
    canvas.index_put_((at.reshape(-1),), colour.reshape(-1))

"""The letterbox on tensors (any device): what utils/ops/images.py does with OpenCV, for images decoded on the GPU.

Resizing is two matrix products per group of same-sized images (rows, then columns), with the
weights of OpenCV's kernels: INTER_AREA (exact pixel overlap) when shrinking, INTER_LINEAR
(half-pixel centres, edge clamped) otherwise, as `load_resized` chooses. OpenCV computes 8-bit
resizes in fixed point, so pixels differ from it by at most a level or two; the geometry (size,
ratio, padding) is the same rule, `letterbox_geometry`, so boxes map back identically.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from utils.ops.images import GRAY, fit_scale, letterbox_geometry


def area_weights(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """[dst, src] weights of a shrink: each output pixel averages the source pixels it covers, by overlap."""
    scale = src / dst
    lo = torch.arange(dst, device=device, dtype=torch.float64)[:, None] * scale                     # dst,1
    hi = torch.clamp(lo + scale, max=src)
    left = torch.arange(src, device=device, dtype=torch.float64)[None]                              # 1,src
    overlap = (torch.minimum(hi, left + 1) - torch.maximum(lo, left)).clamp_(min=0)                 # dst,src
    return (overlap / overlap.sum(1, keepdim=True)).float()


def linear_weights(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """[dst, src] bilinear weights, half-pixel centres; taps beyond the edges fall on the edge pixel."""
    x = (torch.arange(dst, device=device, dtype=torch.float64) + 0.5) * (src / dst) - 0.5
    x = x.clamp(min=0)
    first = x.floor().clamp(max=src - 1)
    frac = (x - first).clamp(max=1)
    taps = torch.stack([first, (first + 1).clamp(max=src - 1)], 1).long()                         # dst,2
    weights = torch.stack([1 - frac, frac], 1)
    return torch.zeros(dst, src, device=device, dtype=torch.float64).scatter_add_(1, taps, weights).float()


@lru_cache(maxsize=64)
def resize_weights(src: int, dst: int, shrink: bool, device: torch.device) -> torch.Tensor:
    """One axis's [dst, src] resampling matrix (identity when the size is kept); kept per size pair, read-only."""
    if src == dst:
        return torch.eye(src, device=device)
    return area_weights(src, dst, device) if shrink else linear_weights(src, dst, device)


def resize_group(images: torch.Tensor, size: tuple[int, int], shrink: bool) -> torch.Tensor:
    """Same-sized uint8 images [N,3,h,w] -> [N,3,H,W] uint8, rounded half up as OpenCV's 8-bit resize."""
    h, w = images.shape[2:]
    if (h, w) == tuple(size):
        return images
    rows = resize_weights(h, size[0], shrink, images.device)                                      # H,h
    cols = resize_weights(w, size[1], shrink, images.device)                                      # W,w
    out = rows @ images.float() @ cols.T                                                          # N,3,H,W
    return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def letterbox_tensors(images: list[torch.Tensor], input_shape: tuple[int, int],
                      letterbox: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """RGB uint8 images [3,h,w] (one device) -> batch [B,3,H,W] uint8 and metas [B,6] (rx, ry, pad_x, pad_y, w0, h0).

    letterbox False: stretched to the input (INTER_LINEAR both ways), as YOLO(letterbox=False) does.
    """
    device = images[0].device
    batch = torch.full((len(images), 3, *input_shape), GRAY, dtype=torch.uint8, device=device)
    metas = np.empty((len(images), 6), dtype=np.float64)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(i)
    for (h0, w0), members in groups.items():
        stacked = torch.stack([images[i] for i in members])                                        # n,3,h0,w0
        if letterbox:
            h, w, ratio, px, py = letterbox_geometry(h0, w0, input_shape)
            resized = resize_group(stacked, (h, w), shrink=fit_scale(h0, w0, input_shape) < 1)
            batch[members, :, py:py + h, px:px + w] = resized
            metas[members] = (ratio, ratio, px, py, w0, h0)
        else:
            batch[members] = resize_group(stacked, input_shape, shrink=False)
            metas[members] = (input_shape[1] / w0, input_shape[0] / h0, 0, 0, w0, h0)
    return batch, metas

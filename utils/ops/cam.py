"""Class-activation maps from one layer's activations (and gradients), and their renormalisation inside boxes.

EigenCAM (Muhammad & Yeasin, 2020) needs no gradient: the activations' first principal component,
projected back onto every position. Grad-CAM (Selvaraju et al., 2017) weighs each channel by its
mean gradient; LayerCAM (Jiang et al., 2021) weighs every position by its own positive gradient.
"""
from __future__ import annotations

import numpy as np
import torch


def eigen_cam(acts: torch.Tensor) -> torch.Tensor:
    """Activations [B,C,H,W] -> [B,H,W]: each position's coordinate on the first principal component.

    Positions are the samples and channels the variables: the activations, centred over positions,
    are projected onto the first right-singular vector. A singular vector's sign is arbitrary; it is
    chosen so the map correlates positively with the channel-mean activation (zero correlation keeps +).
    """
    b, c, h, w = acts.shape
    flat = acts.detach().float().flatten(2).transpose(1, 2)                 # B,HW,C
    centred = flat - flat.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)              # vh B,k,C
    proj = (centred @ vh[:, 0, :, None])[..., 0]                            # B,HW
    ref = flat.mean(2)
    ref = ref - ref.mean(1, keepdim=True)
    sign = torch.where((proj * ref).sum(1, keepdim=True) < 0, -1.0, 1.0)
    return (proj * sign).reshape(b, h, w)


def grad_cam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of dY/dA_k: [B,C,H,W] twice -> [B,H,W]."""
    weights = grads.float().mean((2, 3), keepdim=True)                      # B,C,1,1
    return (weights * acts.float()).sum(1).clamp(min=0)


def layer_cam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k ReLU(dY/dA_k) * A_k), position by position: [B,C,H,W] twice -> [B,H,W]."""
    return (grads.float().clamp(min=0) * acts.float()).sum(1).clamp(min=0)


def box_pixels(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A box (x1, y1, x2, y2, float pixels) -> integer slice bounds covering it, clipped to the image."""
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
    return x1, y1, x2, y2


def renormalise_in_boxes(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Maps [H,W] (one for every box) or [N,H,W] (one per box) -> [H,W]: 0 outside the boxes, each box's
    map min-max scaled to 0..1 inside it (a flat box is 0); where boxes overlap, the larger value."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = maps.shape[-2:]
    per_box = maps if maps.ndim == 3 else np.broadcast_to(maps, (len(boxes), height, width))
    out = np.zeros((height, width), np.float32)
    for m, box in zip(per_box, boxes):
        x1, y1, x2, y2 = box_pixels(box, width, height)
        if x2 <= x1 or y2 <= y1:
            continue
        patch = m[y1:y2, x1:x2].astype(np.float64)
        lo, hi = patch.min(), patch.max()
        scaled = (patch - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(patch)
        out[y1:y2, x1:x2] = np.maximum(out[y1:y2, x1:x2], scaled)
    return out

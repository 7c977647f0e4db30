"""Batched augmentation in torch: the GPU renderer for the plans of utils/augment.py.

One `grid_sample` call draws a whole batch: each output image's (up to) four source images
are stacked as the depth of a 5-D volume, and every output pixel samples its own tile's
slice at an exact depth, so bilinear in x/y picks one source. Pixels outside every tile
sample outside the volume, which reads zero, and zero is gray because gray is subtracted first.
Runs on any device (tests run it on the CPU against the OpenCV renderer).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.augment import GRAY, Plans, mix_targets, plan_targets, sample_plans, upload


def render_gpu(cache: torch.Tensor, plans: Plans, input_shape: tuple[int, int], device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw plans from loaded images `cache` [N,3,Hc,Wc] uint8 (gray-padded) -> [B,3,H,W] in 0..1."""
    out_h, out_w = input_shape
    hc, wc = cache.shape[2:]
    tiles = 1 if (plans.src[:, 1:] < 0).all() else plans.src.shape[1]
    src = plans.src[:, :tiles]
    # upload each needed source image once (the cache may live on the CPU)
    unique, slot = np.unique(np.maximum(src, 0), return_inverse=True)
    volume = cache[upload(unique, cache.device)]
    if volume.device.type == "cpu" and device.type == "cuda":
        volume = volume.pin_memory().to(device, non_blocking=True)
    volume = volume[upload(slot.reshape(src.shape), device)]                              # B,T,3,Hc,Wc
    volume = (volume.to(dtype) - GRAY).div_(255).transpose(1, 2)                         # B,3,T,Hc,Wc

    affine = upload(plans.affine[:, :tiles], device, torch.float32)
    rect = upload(np.where((src < 0)[..., None], 0.0, plans.rect[:, :tiles]), device, torch.float32)  # unused: empty
    xs = torch.arange(out_w, device=device, dtype=torch.float32) + 0.5                   # pixel centres
    ys = torch.arange(out_h, device=device, dtype=torch.float32) + 0.5
    in_x = (xs >= rect[..., 0, None]) & (xs < rect[..., 2, None])                       # B,T,W
    in_y = (ys >= rect[..., 1, None]) & (ys < rect[..., 3, None])                       # B,T,H
    inside = in_y[..., :, None] & in_x[..., None, :]                                     # B,T,H,W
    tile = inside.to(torch.uint8).argmax(1, keepdim=True)                                # B,1,H,W
    # source coordinates per tile along each axis, normalised for align_corners=False
    gx = ((xs - affine[..., 1, None]) / affine[..., 0, None]) * (2 / wc) - 1             # B,T,W
    gy = ((ys - affine[..., 3, None]) / affine[..., 2, None]) * (2 / hc) - 1             # B,T,H
    b, t = gx.shape[:2]
    gx = gx[:, :, None, :].expand(b, t, out_h, out_w).gather(1, tile)[:, 0]              # B,H,W
    gy = gy[:, :, :, None].expand(b, t, out_h, out_w).gather(1, tile)[:, 0]
    gz = (2 * tile[:, 0].float() + 1) / t - 1
    gx = torch.where(inside.any(1), gx, torch.full_like(gx, -2.0))                       # outside -> gray
    grid = torch.stack([gx, gy, gz], -1)[:, None].to(dtype)                              # B,1,H,W,3
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :, 0].add_(GRAY / 255).clamp_(0, 1)


def hsv_gpu(images: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Scale hue (cyclic), saturation and value of RGB images [B,3,H,W] in 0..1 by gains [B,3]."""
    r, g, b = images.float().unbind(1)
    value, _ = torch.stack([r, g, b], 1).max(1)
    delta = value - torch.minimum(torch.minimum(r, g), b)
    sat = torch.where(value > 0, delta / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = delta.clamp(min=1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    gains = gains.to(images.device, torch.float32)[:, :, None, None]
    hue = (hue * gains[:, 0]) % 1
    sat = (sat * gains[:, 1]).clamp(0, 1)
    value = (value * gains[:, 2]).clamp(0, 1)
    # HSV -> RGB: each channel from its own phase of the hue wheel
    phase = torch.arange(5.0, 0.0, -2.0, device=images.device)                           # 5, 3, 1 for R, G, B
    k = (phase[None, :, None, None] + hue[:, None] * 6) % 6
    weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    rgb = value[:, None] - value[:, None] * sat[:, None] * weight
    return rgb.to(images.dtype)


class GpuAugmenter:
    """Makes augmented training batches from decoded images held in memory (GPU or pinned RAM)."""

    def __init__(self, images: torch.Tensor, sizes: np.ndarray, boxes: torch.Tensor, labels: torch.Tensor,
                 counts: torch.Tensor, input_shape: tuple[int, int], hyp: dict, device: torch.device):
        self.images = images                     # N,3,Hc,Wc uint8 RGB, gray-padded
        self.sizes = sizes                       # N,2 loaded (h, w)
        self.boxes = boxes.to(device)            # N,K,4 loaded pixels
        self.labels = labels.to(device)          # N,K
        self.counts = counts.to(device)          # N
        self.input_shape = input_shape
        self.hyp = hyp
        self.device = device

    def __call__(self, index: np.ndarray, rng: np.random.Generator, mosaic: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,H,W] in 0..1 and targets [M,6] for the records `index`."""
        plans = sample_plans(rng, index, self.sizes, self.input_shape, self.hyp, mosaic)
        images = hsv_gpu(render_gpu(self.images, plans, self.input_shape, self.device, dtype),
                         upload(plans.hsv, self.device, torch.float32))
        targets = plan_targets(plans, self.boxes, self.labels, self.counts, self.input_shape)
        if plans.mixup.any():
            partner = np.roll(np.arange(len(plans)), 1)
            lam = upload(np.where(plans.mixup, plans.lam, 1.0), self.device, images.dtype)
            images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[partner]
            targets = mix_targets(targets, partner, plans.mixup)
        return images, targets

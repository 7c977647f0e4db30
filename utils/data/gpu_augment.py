"""Batched augmentation in torch: the GPU renderer for the plans of utils/data/augment.py.

A plan's tiles are axis-aligned scalings, so bilinear resampling separates into one matrix per
axis: tile t of output image b is `Ry[b,t] @ source @ Rx[b,t]^T`, where row o of Rx holds the
linear-interpolation weights max(0, 1 - |p(o) - i|) of output column o over source columns i
(zero outside the tile's rectangle). Summing the tiles composes the mosaic, so a whole batch
is two batched matrix products on tensor cores instead of a gather per output pixel.
Weights falling outside the source image are dropped (as sampling with zero padding), and
gray is what shows where weight is missing. Runs on any device (tests run it on the CPU
against the OpenCV renderer).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from utils.data.augment import GRAY, Plans, mix_targets, plan_targets, sample_plans, upload


def resampling_weights(scale: torch.Tensor, offset: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       out_size: int, src_size: int, dtype: torch.dtype,
                       gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear weights along one axis for tiles mapping `out = scale * src + offset`, [B,T] each.

    Returns the matrices [B,T,out,src] (x gain, in dtype; a strided view, laid out by the caller as its
    product needs) and each output pixel's total weight [B,T,out] (1 inside the source, less at its edges,
    0 outside the tile's [lo, hi)). Two taps per output pixel are scattered into zeros: the dense matrix is
    written once.
    """
    centres = torch.arange(out_size, device=scale.device, dtype=torch.float32) + 0.5                 # O
    source = (centres - offset[..., None]) / scale[..., None] - 0.5                                  # B,T,O pixel coords
    inside = (centres >= lo[..., None]) & (centres < hi[..., None])                                  # B,T,O
    first = source.floor()
    upper = source - first
    taps = torch.stack([first, first + 1], -1)                                                       # B,T,O,2
    weights = torch.stack([1 - upper, upper], -1) * inside[..., None]
    weights = weights * ((taps >= 0) & (taps < src_size))                                            # zero padding
    # column 0 and src_size + 1 of the scatter target catch taps beyond the edges (their weight is 0)
    matrix = torch.zeros(*source.shape, src_size + 2, device=scale.device, dtype=dtype)
    matrix.scatter_(3, taps.clamp(-1, src_size).long() + 1, (weights * gain).to(dtype))
    return matrix[..., 1:-1], weights.sum(-1)


def render_gpu(cache: torch.Tensor, plans: Plans, input_shape: tuple[int, int], device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw plans from loaded images `cache` [N,Hc,3,Wc] uint8 (gray-padded) -> [B,3,H,W] in 0..1."""
    return paint_tiles(*tile_sources(cache, plans, device), input_shape, dtype)


def tile_sources(cache: torch.Tensor, plans: Plans,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The host's share of rendering: (images, slot [B,T], affine [B,T,4], rect [B,T,4]) on `device`, where tile t
    of output b draws images[slot[b,t]]; T is 1 when no plan uses a second tile, else 4.

    Images cached on `device` are passed whole; from (pinned) RAM each needed source is uploaded once.
    Unused tiles get the identity map and an empty rectangle, so they paint nothing.
    """
    tiles = 1 if (plans.src[:, 1:] < 0).all() else plans.src.shape[1]
    src = np.maximum(plans.src[:, :tiles], 0)
    if cache.device == device:
        images, slot = cache, src
    else:
        unique, slot = np.unique(src, return_inverse=True)
        images = cache[torch.from_numpy(unique)].pin_memory().to(device, non_blocking=True)
    unused = (plans.src[:, :tiles] < 0)[..., None]
    affine = upload(np.where(unused, [1.0, 0.0, 1.0, 0.0], plans.affine[:, :tiles]), device, torch.float32)
    rect = upload(np.where(unused, 0.0, plans.rect[:, :tiles]), device, torch.float32)
    return images, upload(slot.reshape(src.shape), device), affine, rect


def paint_tiles(images: torch.Tensor, slot: torch.Tensor, affine: torch.Tensor, rect: torch.Tensor,
                input_shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Tiles of `images` [N,Hc,3,Wc] uint8 -> [B,3,H,W] in 0..1 (tile_sources' outputs). Tensors only, with
    shapes fixed by the batch and the tile count, so torch.compile can fuse it (GpuAugmenter's `pixels`)."""
    out_h, out_w = input_shape
    b, tiles = slot.shape
    hc, wc = images.shape[1], images.shape[3]
    # rows x channels x columns, so that the row pass below needs no per-channel copies
    volume = images[slot].to(dtype)                                                     # B,T,Hc,3,Wc 0..255
    rx, rx_mass = resampling_weights(affine[..., 0], affine[..., 1], rect[..., 0], rect[..., 2], out_w, wc, dtype)
    ry, ry_mass = resampling_weights(affine[..., 2], affine[..., 3], rect[..., 1], rect[..., 3], out_h, hc, dtype,
                                     gain=1 / 255)
    # contiguous rows keep the product on the fast tensor-core kernels
    columns = volume.view(b, tiles, hc * 3, wc) @ rx.contiguous().transpose(2, 3)       # B,T,Hc*3,W
    # the column pass summed over tiles is one product over (tile, source row): no per-tile outputs
    rows = ry.transpose(1, 2).reshape(b, out_h, tiles * hc)                             # B,H,T*Hc (one copy)
    painted = torch.bmm(rows, columns.view(b, tiles * hc, 3 * out_w)).view(b, out_h, 3, out_w)  # B,H,3,W in 0..1
    # weight each output pixel took from sources: 1 inside an image, less at its borders, 0 elsewhere
    coverage = torch.einsum("bty,btx->byx", ry_mass, rx_mass).to(dtype)                 # B,H,W
    painted = painted.sub_(coverage[:, :, None], alpha=GRAY / 255).add_(GRAY / 255).clamp_(0, 1)
    return painted.transpose(1, 2)                                                      # B,3,H,W (a view)


def paint_and_shift_colours(images: torch.Tensor, slot: torch.Tensor, affine: torch.Tensor, rect: torch.Tensor,
                            gains: torch.Tensor, input_shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """paint_tiles, then hsv_gpu with gains [B,3]: the pixel work of one batch, as one function to compile."""
    return hsv_gpu(paint_tiles(images, slot, affine, rect, input_shape, dtype), gains)


def hsv_gpu(images: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Scale hue (cyclic), saturation and value of RGB images [B,3,H,W] in 0..1 by gains [B,3].

    Computed in the images' dtype: in half precision the hue is resolved to ~0.004 of a sixth,
    8x finer than the 2-degree steps of OpenCV's 8-bit HSV that the CPU path uses.
    """
    r, g, b = images.unbind(1)                                                            # B,H,W each
    value = torch.maximum(torch.maximum(r, g), b)
    delta = value - torch.minimum(torch.minimum(r, g), b)
    sat = delta / value.clamp(min=1e-3)
    # hue in sixths of the circle, from the largest channel; any hue where delta is 0 (gray)
    hue = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * delta, r - g + 4 * delta))
    gains = gains.to(images.device, images.dtype)[:, :, None, None]                      # B,3,1,1
    hue = (hue / delta.clamp(min=1e-3) % 6)[:, None] * gains[:, 0:1] % 6                # B,1,H,W
    value = (value[:, None] * gains[:, 2:3]).clamp_(0, 1)
    chroma = value * (sat[:, None] * gains[:, 1:2]).clamp_(0, 1)                          # value x saturation
    # back to RGB: channel c = value - chroma * clamp(min(k, 4 - k), 0, 1), k = (phase_c + hue) % 6
    phase = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype)[None, :, None, None]  # R,G,B
    k = (phase + hue) % 6
    return torch.addcmul(value, chroma, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1)


class GpuAugmenter:
    """Makes augmented training batches from decoded images held in memory (GPU or pinned RAM)."""

    def __init__(self, images: torch.Tensor, sizes: np.ndarray, boxes: torch.Tensor, labels: torch.Tensor,
                 counts: torch.Tensor, input_shape: tuple[int, int], hyp: dict, device: torch.device,
                 pixels: Callable | None = None):
        """pixels: paint_and_shift_colours or a compiled form of it (--compile fuses its kernels)."""
        self.images = images                     # N,Hc,3,Wc uint8 RGB, gray-padded (rows x channels x columns)
        self.sizes = sizes                       # N,2 loaded (h, w)
        self.boxes = boxes.to(device)            # N,K,4 loaded pixels
        self.labels = labels.to(device)          # N,K
        self.counts = counts.to(device)          # N
        self.input_shape = input_shape
        self.hyp = hyp
        self.device = device
        self.pixels = pixels or paint_and_shift_colours

    def __call__(self, index: np.ndarray, rng: np.random.Generator, mosaic: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,H,W] in 0..1 and per-image targets [B,K,6] (padding rows: image -1) for the records `index`."""
        plans = sample_plans(rng, index, self.sizes, self.input_shape, self.hyp, mosaic)
        images = self.pixels(*tile_sources(self.images, plans, self.device), upload(plans.hsv, self.device, dtype),
                             self.input_shape, dtype)
        targets = plan_targets(plans, self.boxes, self.labels, self.counts, self.input_shape).view(len(plans), -1, 6)
        if plans.mixup.any():
            partner = np.roll(np.arange(len(plans)), 1)
            lam = upload(np.where(plans.mixup, plans.lam, 1.0), self.device, images.dtype)
            images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[partner]
            targets = mix_targets(targets, partner, plans.mixup)
        return images, targets

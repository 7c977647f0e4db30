"""Training augmentation as *plans*: sampled once, rendered on the CPU (OpenCV) or batched on the GPU (torch).

A plan says, for each output image, which source images fill it and where: up to four
axis-aligned tiles (one for letterbox/scale/aspect/translate, four for mosaic), each an
affine map `out = a * src + b` per axis in continuous pixel coordinates (pixel i covers
[i, i+1)) and the output rectangle it fills; horizontal flip is a negative `a`. Plus HSV
gains and a mixup weight. `sample_plans` draws plans, `transform_boxes` moves boxes, and
both renderers (`render_cpu` here, `render_gpu` in utils/data/gpu_augment.py) draw the pixels,
so the CPU and GPU paths share every random draw and every box.

Source images are "loaded" images: resized once so they fit the input size (what the
caches hold); plans are in those pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from utils.ops.images import GRAY
MAX_TILES = 4
# YOLOv5's box candidate rules after augmentation
MIN_BOX_SIDE = 2.0
MIN_AREA_RATIO = 0.1
MAX_ASPECT = 20.0


@dataclass
class Plans:
    """Where each of B output images comes from (arrays over B images x 4 tiles)."""

    src: np.ndarray      # [B,4] int64 record index; -1 = tile unused
    affine: np.ndarray   # [B,4,4] float64 (ax, bx, ay, by): out = a * src + b
    rect: np.ndarray     # [B,4,4] float64 output region x0, y0, x1, y1 filled by the tile
    hsv: np.ndarray      # [B,3] float64 gains for hue, saturation, value
    mixup: np.ndarray    # [B] bool: blend with a second image
    lam: np.ndarray      # [B] float64 weight of this image when mixed

    def __len__(self) -> int:
        return len(self.src)


def sample_plans(rng: np.random.Generator, index: np.ndarray, sizes: np.ndarray, input_shape: tuple[int, int],
                 hyp: dict, mosaic: bool) -> Plans:
    """Draw plans for output images built around records `index`; sizes [N,2] are loaded (h, w)."""
    index = np.asarray(index, dtype=np.int64)
    b, (out_h, out_w) = len(index), input_shape
    # every draw happens whatever the branch, so a plan depends only on the generator's state
    use_mosaic = (rng.random(b) < hyp.get("mosaic", 0.0)) & mosaic
    others = rng.integers(0, len(sizes), (b, MAX_TILES - 1))
    scale = rng.uniform(1 - hyp.get("scale", 0.0), 1 + hyp.get("scale", 0.0), b)
    aspect = rng.uniform(1 - hyp.get("aspect", 0.0), 1 + hyp.get("aspect", 0.0), b)
    shift = rng.uniform(-hyp.get("translate", 0.0), hyp.get("translate", 0.0), (b, 2)) * (out_w, out_h)
    centre = rng.uniform(0.5, 1.5, (b, 2)) * (out_w, out_h)
    flip = rng.random(b) < hyp.get("fliplr", 0.0)
    hsv = 1 + rng.uniform(-1, 1, (b, 3)) * [hyp.get("hsv_h", 0.0), hyp.get("hsv_s", 0.0), hyp.get("hsv_v", 0.0)]
    mixup = rng.random(b) < hyp.get("mixup", 0.0)
    lam = rng.beta(32.0, 32.0, b)

    src = np.full((b, MAX_TILES), -1, dtype=np.int64)
    src[:, 0] = index
    src[use_mosaic, 1:] = others[use_mosaic]
    sx, sy = scale * aspect, scale
    affine = np.zeros((b, MAX_TILES, 4))
    rect = np.zeros((b, MAX_TILES, 4))

    # single image: scaled, centred as a letterbox would be, then shifted
    h0, w0 = sizes[index, 0], sizes[index, 1]
    affine[:, 0] = np.stack([sx, (out_w - w0 * sx) / 2 + shift[:, 0], sy, (out_h - h0 * sy) / 2 + shift[:, 1]], 1)
    rect[:, 0] = (0, 0, out_w, out_h)

    # mosaic: four images meet at `centre` on a 2W x 2H canvas; the canvas is scaled about its
    # middle and shifted into the output, as YOLOv5's mosaic followed by its random affine
    m = np.flatnonzero(use_mosaic)
    if len(m):
        xc, yc = centre[m, 0], centre[m, 1]
        for k in range(MAX_TILES):
            h, w = sizes[src[m, k], 0].astype(float), sizes[src[m, k], 1].astype(float)
            left = xc - w if k in (0, 2) else xc
            top = yc - h if k in (0, 1) else yc
            canvas = np.stack([np.maximum(left, 0), np.maximum(top, 0),
                               np.minimum(left + w, 2 * out_w), np.minimum(top + h, 2 * out_h)], 1)
            # canvas -> output: out = (c - W) * s + W / 2 + shift
            bx = out_w / 2 + shift[m, 0] - out_w * sx[m]
            by = out_h / 2 + shift[m, 1] - out_h * sy[m]
            affine[m, k] = np.stack([sx[m], left * sx[m] + bx, sy[m], top * sy[m] + by], 1)
            out_rect = np.stack([canvas[:, 0] * sx[m] + bx, canvas[:, 1] * sy[m] + by,
                                 canvas[:, 2] * sx[m] + bx, canvas[:, 3] * sy[m] + by], 1)
            rect[m, k] = np.clip(out_rect, 0, [out_w, out_h, out_w, out_h])

    # horizontal flip of the whole output image
    affine[flip, :, 0] *= -1
    affine[flip, :, 1] = out_w - affine[flip, :, 1]
    rect[flip, :, 0], rect[flip, :, 2] = out_w - rect[flip, :, 2], out_w - rect[flip, :, 0]
    return Plans(src, affine, rect, hsv, mixup, lam)


def transform_boxes(boxes: torch.Tensor, affine: torch.Tensor, rect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source boxes [T,K,4] xyxy through tile affines [T,4] and clip rects [T,4] -> (boxes, keep [T,K]).

    A box survives if it keeps > 2 px per side, > 10% of its transformed area, and an aspect < 20.
    """
    ax, bx, ay, by = (affine[:, i, None] for i in range(4))
    xs = boxes[..., 0::2] * ax[..., None] + bx[..., None]          # T,K,2 (swapped by a flip)
    ys = boxes[..., 1::2] * ay[..., None] + by[..., None]
    x1, x2 = xs.amin(-1), xs.amax(-1)
    y1, y2 = ys.amin(-1), ys.amax(-1)
    area0 = (x2 - x1) * (y2 - y1)
    x1, x2 = x1.clamp(rect[:, 0:1], rect[:, 2:3]), x2.clamp(rect[:, 0:1], rect[:, 2:3])
    y1, y2 = y1.clamp(rect[:, 1:2], rect[:, 3:4]), y2.clamp(rect[:, 1:2], rect[:, 3:4])
    w, h = x2 - x1, y2 - y1
    keep = (w > MIN_BOX_SIDE) & (h > MIN_BOX_SIDE) & (w * h > MIN_AREA_RATIO * area0)
    keep &= torch.maximum(w / (h + 1e-9), h / (w + 1e-9)) < MAX_ASPECT
    return torch.stack([x1, y1, x2, y2], -1), keep


def upload(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A NumPy array on `device` without waiting for the GPU: pinned memory, non-blocking copy."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype is not None:
        tensor = tensor.to(dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def plan_targets(plans: Plans, boxes: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                 input_shape: tuple[int, int]) -> torch.Tensor:
    """Targets (image, class, cx, cy, w, h normalised) for rendered plans, before mixup: [B*4*K, 6].

    boxes [N,K,4] / labels [N,K] / counts [N] are every record's loaded boxes, padded to K.
    Fixed size, so nothing waits for the GPU: rows of boxes that did not survive have image -1.
    """
    device = boxes.device
    src = upload(plans.src, device)
    used = src >= 0
    src = src.clamp(min=0)
    tile_boxes, keep = transform_boxes(boxes[src].flatten(0, 1),
                                       upload(plans.affine, device, boxes.dtype).flatten(0, 1),
                                       upload(plans.rect, device, boxes.dtype).flatten(0, 1))
    k = boxes.shape[1]
    keep &= (torch.arange(k, device=device) < counts[src].flatten()[:, None]) & used.flatten()[:, None]   # B*4,K
    image = torch.arange(len(plans), device=device).repeat_interleave(MAX_TILES)[:, None].expand(-1, k)
    image = torch.where(keep, image, -1).reshape(-1, 1).to(boxes.dtype)
    xyxy = tile_boxes.reshape(-1, 4)
    scale = upload(np.array([input_shape[1], input_shape[0]], np.float32), device, xyxy.dtype)
    cxcy = (xyxy[:, :2] + xyxy[:, 2:]) / 2 / scale
    wh = (xyxy[:, 2:] - xyxy[:, :2]) / scale
    cls = labels[src].reshape(-1, 1).to(xyxy.dtype)
    return torch.cat([image, cls, cxcy, wh], 1)


def mix_targets(targets: torch.Tensor, partner: np.ndarray, mixup: np.ndarray) -> torch.Tensor:
    """Give each mixed image i the boxes of image partner[i] too: per-image targets [B,K,6] -> [B,2K,6].

    Fixed size, so nothing waits for the GPU: the copies given to unmixed images are padding (image -1).
    """
    if not mixup.any():
        return targets
    device = targets.device
    extra = targets[upload(partner, device)].clone()                                   # B,K,6
    owner = torch.arange(len(partner), device=device, dtype=targets.dtype)[:, None].expand_as(extra[..., 0])
    keep = upload(mixup, device)[:, None] & (extra[..., 0] >= 0)
    extra[..., 0] = torch.where(keep, owner, -1)
    return torch.cat([targets, extra], 1)


def render_cpu(sources: list[np.ndarray | None], affine: np.ndarray, rect: np.ndarray,
               input_shape: tuple[int, int]) -> np.ndarray:
    """Draw one plan's tiles (loaded source images, BGR uint8) into a gray HxWx3 image with OpenCV."""
    out = np.full((input_shape[0], input_shape[1], 3), GRAY, dtype=np.uint8)
    for image, (ax, bx, ay, by), (x0, y0, x1, y1) in zip(sources, affine, rect):
        if image is None:
            continue
        # pixels whose centres fall inside the tile's rectangle
        j0, j1 = int(np.ceil(x0 - 0.5)), int(np.ceil(x1 - 0.5))
        i0, i1 = int(np.ceil(y0 - 0.5)), int(np.ceil(y1 - 0.5))
        if j1 <= j0 or i1 <= i0:
            continue
        # OpenCV maps pixel indices: dst = a * src + (b + a/2 - 1/2), shifted to the crop's origin
        m = np.array([[ax, 0, bx + 0.5 * ax - 0.5 - j0], [0, ay, by + 0.5 * ay - 0.5 - i0]])
        out[i0:i1, j0:j1] = cv2.warpAffine(image, m, (j1 - j0, i1 - i0), flags=cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_CONSTANT, borderValue=(GRAY, GRAY, GRAY))
    return out


def hsv_cpu(image: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Scale hue (cyclic), saturation and value of a BGR uint8 image by `gains`."""
    if np.allclose(gains, 1):
        return image
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)

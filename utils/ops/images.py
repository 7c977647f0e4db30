"""Image geometry shared by training and inference: fitting an image into the input, and the letterbox.

Inference (yolo.py) and the augmentation renderers both use these, so a box maps to the same
pixels in training and prediction; this module knows nothing of augmentation.
"""
from __future__ import annotations

import cv2
import numpy as np

GRAY = 114     # the padding colour (YOLOv5's)


def fit_scale(height: int, width: int, input_shape: tuple[int, int]) -> float:
    """Scale that fits an image inside the input (the letterbox ratio)."""
    return min(input_shape[0] / height, input_shape[1] / width)


def fitted_size(height: int, width: int, input_shape: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image once resized to fit the input: the one rounding rule of load_resized."""
    r = fit_scale(height, width, input_shape)
    return max(1, round(height * r)), max(1, round(width * r))


def load_resized(image: np.ndarray, input_shape: tuple[int, int]) -> np.ndarray:
    """Resize a decoded image so it fits the input, keeping its aspect ratio (the cached form)."""
    h, w = image.shape[:2]
    r = fit_scale(h, w, input_shape)
    if r == 1:
        return image
    new_h, new_w = fitted_size(h, w, input_shape)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)


def letterbox_geometry(height: int, width: int, input_shape: tuple[int, int]) -> tuple[int, int, float, int, int]:
    """(h, w, ratio, pad_x, pad_y) of an image letterboxed into the input: resized to (h, w), centred.

    The one rule both letterboxes (OpenCV arrays here, tensors in utils/ops/tensor_letterbox.py) follow,
    so boxes map back to the same original pixels whichever made the batch.
    """
    h, w = fitted_size(height, width, input_shape)
    return h, w, w / width, (input_shape[1] - w) // 2, (input_shape[0] - h) // 2


def letterbox(image: np.ndarray, input_shape: tuple[int, int],
              canvas: tuple[int, int] | None = None) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize to fit and pad with gray to the input size, centred; returns (image, ratio, (pad_x, pad_y)).

    `canvas` (h, w), at least the fitted size: centre the fitted image on a canvas of that size instead
    (margin_canvas's rectangular input).
    """
    h, w, ratio, pad_x, pad_y = letterbox_geometry(image.shape[0], image.shape[1], input_shape)
    if canvas is not None:
        pad_x, pad_y = (canvas[1] - w) // 2, (canvas[0] - h) // 2
    resized = load_resized(image, input_shape)
    out = np.full((*(canvas or input_shape), 3), GRAY, dtype=np.uint8)
    out[pad_y:pad_y + h, pad_x:pad_x + w] = resized
    return out, ratio, (float(pad_x), float(pad_y))


def margin_canvas(sizes: list[tuple[int, int]], margin: float, stride: int = 32) -> tuple[int, int]:
    """(h, w) of a rectangular input holding every fitted (h, w) of a batch with at least `margin` strides of
    gray on each axis, rounded up to the stride: ultralytics' val.py batches (its pad 0.5: a 416 x 312 image
    on 448 x 352). An image then never touches the input's edge, where its border objects score lower."""
    h = max(size[0] for size in sizes)
    w = max(size[1] for size in sizes)
    return (int(np.ceil(h / stride + margin)) * stride, int(np.ceil(w / stride + margin)) * stride)


def map_to_image(values: np.ndarray, meta: np.ndarray, input_shape: tuple[int, int]) -> np.ndarray:
    """A map over the whole network input (any resolution, e.g. a stride-16 feature map) -> float32 [h0,w0]
    over the original image: stretched to the input, the letterbox padding cut off, resized to the image.

    meta is the image's (rx, ry, pad_x, pad_y, w0, h0), as yolo.YOLO.preprocess returns it.
    """
    rx, ry, px, py, w0, h0 = (float(v) for v in meta)
    h, w = input_shape
    full = cv2.resize(np.ascontiguousarray(values, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    top, left = int(py), int(px)
    crop = full[top:top + max(1, round(h0 * ry)), left:left + max(1, round(w0 * rx))]
    return cv2.resize(crop, (int(w0), int(h0)), interpolation=cv2.INTER_LINEAR)

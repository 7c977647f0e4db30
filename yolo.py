"""class YOLO: the one inference pipeline (letterbox -> model -> decode -> batched NMS -> original pixels).

predict.py, get_map.py, the evaluation during training, fps and heatmap modes all go through it. An exported
.onnx file takes the PyTorch network's place (utils/engine/onnx_runtime.py); everything around it is the same.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from nets.common import fuse_conv_bn
from nets.heads import build_head
from nets.yolo import as_model_config, build_model
from utils.ops.images import fitted_size, letterbox, margin_canvas
from utils.ops.tensor_letterbox import letterbox_tensors
from utils.ops.boxes import CellCache, non_max_suppression
from utils.engine.checkpoint import load_checkpoint
from utils.engine.explain.objectness import objectness_picture
from utils.engine.onnx_runtime import OnnxModel, is_onnx
from utils.config import PREDICT_DETECTION, ModelConfig
from utils.data.dataset import load_image
from utils.ops.plots import draw_detections
from utils.engine.torch_utils import CudaGraphForward, select_device
from utils.log import get_logger

log = get_logger(__name__)
ImageLike = str | Path | np.ndarray | Image.Image


@lru_cache(maxsize=1)
def _preprocess_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def to_bgr(image: ImageLike) -> np.ndarray:
    """A path, an OpenCV BGR array (uint8 0..255, or float 0..1) or a PIL image -> BGR uint8 HxWx3."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        image = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    if not isinstance(image, np.ndarray):
        raise ValueError(f"cannot read an image from {type(image).__name__}; give a path, a BGR array or a PIL image")
    if image.ndim not in (2, 3) or image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array of shape {image.shape}: expected HxW, HxWx1, HxWx3 (BGR) or HxWx4 (BGRA)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image array (shape {image.shape})")
    image = _as_uint8(image)
    if image.ndim == 2 or image.shape[2] == 1:
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    return image[:, :, :3]


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 as it is; floats in 0..1 scaled to 0..255 (read as uint8 they would be black); anything else refused."""
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        lo, hi = float(image.min()), float(image.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
            raise ValueError(f"float image values must lie in 0..1 (found {lo:g}..{hi:g}); "
                             f"give uint8 0..255 or float 0..1")
        return (image * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"image array of dtype {image.dtype}: give uint8 (0..255) or float (0..1)")


class YOLO:
    """Detector built from a checkpoint's config alone: no phi, classes or anchors to repeat."""

    def __init__(self, weights: str | Path, device: str | torch.device | None = None,
                 conf: float = PREDICT_DETECTION.conf, nms_iou: float = PREDICT_DETECTION.nms_iou,
                 letterbox: bool = True, half: bool | None = None,
                 max_det: int = 300, multi_label: bool = False, img: int | None = None,
                 cuda_graph: bool | None = None, margin: float = 0.0):
        if is_onnx(weights):
            if margin:
                raise ValueError(f"a margin needs a .pt checkpoint: {weights} has a fixed input size")
            self._init_onnx(weights, device, conf, nms_iou, letterbox, half, max_det, multi_label, img)
            return
        ckpt = load_checkpoint(weights)
        config = as_model_config(ckpt["config"])
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
        if img is not None:
            config = dataclasses.replace(config, input_shape=[img, img]).validate()
        self._setup(model, config, device, conf, nms_iou, letterbox, half, max_det, multi_label, margin)
        self.weights = str(weights)
        self.owns_model = True
        self._optimise_owned_model(cuda_graph)

    def _init_onnx(self, weights, device, conf, nms_iou, letterbox, half, max_det, multi_label, img) -> None:
        """An exported model run by ONNX Runtime; its precision, and its size unless exported --dynamic, are fixed."""
        onnx = OnnxModel(weights, device)
        config = onnx.config
        if img is not None and img != config.input_shape[0]:
            if not onnx.dynamic:
                raise ValueError(f"--img {img}: {weights} was exported at {config.input_shape[0]} px without "
                                 f"--dynamic; re-export it with --img {img} or --dynamic")
            config = dataclasses.replace(config, input_shape=[img, img]).validate()
        if half is not None and bool(half) != onnx.half:
            raise ValueError(f"--half/--no-half: {weights} holds {'fp16' if onnx.half else 'fp32'} weights, fixed "
                             f"at export (predict.py --mode export_onnx [--half])")
        if onnx.nms and multi_label:     # e.g. get_map.py's default protocol
            log.warning("%s: its in-graph NMS keeps each box's best class only, so multi-label NMS is not applied "
                        "(export without --nms for it)", weights)
            multi_label = False
        self._setup(onnx, config, "cpu", conf, nms_iou, letterbox, None, max_det, multi_label)
        self.onnx, self.half, self.runtime = onnx, onnx.half, onnx.label
        self.weights = str(weights)
        self.owns_model, self.cuda_graph = True, False

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: ModelConfig | dict, device: str | torch.device | None = None,
                   **kwargs) -> YOLO:
        """Wrap a model already in memory (the trainer's EMA model) without copying weights."""
        self = cls.__new__(cls)
        defaults = dict(conf=PREDICT_DETECTION.conf, nms_iou=PREDICT_DETECTION.nms_iou, letterbox=True, half=None,
                        max_det=300, multi_label=False)
        defaults.update(kwargs)
        self._setup(model, config, device, **defaults)
        self.weights = None
        self.owns_model = False
        self.cuda_graph = False
        return self

    def _setup(self, model, config, device, conf, nms_iou, letterbox, half, max_det, multi_label,
               margin: float = 0.0) -> None:
        config = as_model_config(config)
        self.device = select_device(device)
        self.model = model.to(self.device).eval() if isinstance(model, torch.nn.Module) else model
        self.onnx: OnnxModel | None = None
        self.runtime = str(self.device)          # what runs the network, for display
        self.model_config = config
        self.config = config.to_dict()       # the checkpoint's plain form, for display and saving
        self.class_names = list(config.class_names)
        self.input_shape = tuple(config.input_shape)
        self.head = build_head(config)
        anchors = torch.tensor(config.anchors, dtype=torch.float32)
        self.cells = CellCache([anchors[mask] for mask in config.anchors_mask], self.input_shape[0])
        self.conf, self.nms_iou, self.letterbox = conf, nms_iou, letterbox
        self.max_det, self.multi_label = max_det, multi_label
        # gray strides kept around each image (margin_canvas): the input grows to hold them; 0 = plain letterbox
        self.margin = float(margin)
        self.half = (self.device.type == "cuda") if half is None else bool(half and self.device.type == "cuda")

    def _optimise_owned_model(self, cuda_graph: bool | None) -> None:
        """Inference-only speed-ups for a model this object owns: BN folded, fp16 and channels_last on CUDA,
        and (by default on CUDA) each input shape's forward pass captured once as a CUDA graph."""
        fuse_conv_bn(self.model)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
            if self.half:
                self.model.half()
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph and self.device.type == "cuda")
        self._graphs: dict[tuple, CudaGraphForward] = {}

    def preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """BGR images -> uint8 batch [B,3,H,W] (RGB) and metas [B,6] (rx, ry, pad_x, pad_y, w0, h0).

        Images of a batch are resized on a thread pool (OpenCV releases the GIL).
        """
        canvas = None
        if self.letterbox and self.margin > 0:
            canvas = margin_canvas([fitted_size(*im.shape[:2], self.input_shape) for im in images], self.margin)
        batch = np.empty((len(images), *(canvas or self.input_shape), 3), dtype=np.uint8)
        metas = np.empty((len(images), 6), dtype=np.float64)

        def fit(i: int) -> None:
            image = images[i]
            h0, w0 = image.shape[:2]
            if self.letterbox:
                padded, r, (px, py) = letterbox(image, self.input_shape, canvas)
                metas[i] = (r, r, px, py, w0, h0)
            else:
                padded = cv2.resize(image, (self.input_shape[1], self.input_shape[0]), interpolation=cv2.INTER_LINEAR)
                metas[i] = (self.input_shape[1] / w0, self.input_shape[0] / h0, 0, 0, w0, h0)
            cv2.cvtColor(padded, cv2.COLOR_BGR2RGB, dst=batch[i])

        if len(images) == 1:
            fit(0)
        else:
            list(_preprocess_pool().map(fit, range(len(images))))
        return torch.from_numpy(batch).permute(0, 3, 1, 2), metas

    @torch.no_grad()
    def preprocess_tensors(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """RGB uint8 tensors [3,H,W] (any device) -> the batch on this device and metas, as `preprocess` makes them.

        The letterbox runs where the model does (utils/ops/tensor_letterbox.py), with the same geometry.
        """
        if self.margin:
            raise ValueError("a margin is made by preprocess() (OpenCV images) only, not on tensors")
        return letterbox_tensors([im.to(self.device, non_blocking=True) for im in images], self.input_shape,
                                 self.letterbox)

    def captures(self, batch_size: int) -> bool:
        """Whether the next forward pass of this batch size captures a CUDA graph (no other thread may use CUDA then)."""
        key = (batch_size, 3, *self.input_shape)
        return self.cuda_graph and key not in self._graphs

    def predict_tensors(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Decoded RGB uint8 tensors [3,H,W] (e.g. decoded on the GPU) -> per image [N,6] in original pixels."""
        return self.infer(*self.preprocess_tensors(images)) if images else []

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Raw head outputs for a uint8 (0..255) or float (0..1) batch."""
        x = batch.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.onnx is not None:
            if self.onnx.nms:
                raise ValueError(f"{self.weights} was exported with --nms: it returns final boxes, not the raw maps "
                                 f"this needs; export without --nms")
            return self.onnx(x)
        if not self.owns_model:      # a model lent by the trainer: leave it as it is, use autocast
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.half else nullcontext()
            with autocast:
                return self.model(x)
        x = x.to(next(self.model.parameters()).dtype)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.cuda_graph:
            return self.model(x)
        key = tuple(x.shape)
        if key not in self._graphs:
            self._graphs[key] = CudaGraphForward(self.model, x)
        return self._graphs[key](x)

    @torch.no_grad()
    def postprocess(self, outputs: list[torch.Tensor], metas: np.ndarray,
                    input_height: int | None = None) -> list[np.ndarray]:
        """Raw outputs -> per image [N,6] (x1, y1, x2, y2, score, class) in original pixels (`input_height`:
        the batch's, when it is not the nominal input's)."""
        pred = self.head.decode_outputs(outputs, self.cells(outputs, input_height))
        return self.to_original(non_max_suppression(pred, self.conf, self.nms_iou, self.max_det, self.multi_label),
                                metas)

    def to_original(self, dets: list[torch.Tensor], metas: np.ndarray) -> list[np.ndarray]:
        """Per image [N,6] in input pixels -> in the original image's pixels, clipped to it."""
        # one copy to the host for the whole batch, mapped back in one pass over every box of it
        flat = torch.cat(dets).float().cpu().numpy() if dets else np.zeros((0, 6), np.float32)
        sizes = [d.shape[0] for d in dets]
        rx, ry, px, py, w0, h0 = np.repeat(np.asarray(metas, np.float64).reshape(-1, 6), sizes, axis=0).T  # [K] each
        flat[:, [0, 2]] = ((flat[:, [0, 2]] - px[:, None]) / rx[:, None]).clip(0, w0[:, None])
        flat[:, [1, 3]] = ((flat[:, [1, 3]] - py[:, None]) / ry[:, None]).clip(0, h0[:, None])
        return np.split(flat, np.cumsum(sizes)[:-1]) if dets else []

    def infer(self, batch: torch.Tensor, metas: np.ndarray) -> list[np.ndarray]:
        """Preprocessed batch -> detections in original pixels."""
        if self.onnx is not None and self.onnx.nms:
            return self.to_original(self._graph_detections(batch, len(metas)), metas)
        return self.postprocess(self.forward(batch), metas, batch.shape[-2])

    def _graph_detections(self, batch: torch.Tensor, images: int) -> list[torch.Tensor]:
        """An in-graph-NMS model's [K,7] output split per image into [N,6] (x1, y1, x2, y2, score, class)."""
        x = batch.float().div_(255) if batch.dtype == torch.uint8 else batch.float()
        found = self.onnx.detect(x, self.conf, self.nms_iou)                       # K,7
        return [found[found[:, 0] == i, 1:][:self.max_det] for i in range(images)]        # best first

    def run_network(self, batch: torch.Tensor) -> object:
        """The network alone (with an in-graph-NMS ONNX model: the whole graph), for timing."""
        if self.onnx is not None and self.onnx.nms:
            return self._graph_detections(batch, batch.shape[0])
        return self.forward(batch)

    def predict(self, images: ImageLike | list[ImageLike], batch_size: int = 32) -> list[np.ndarray]:
        """One image or a list -> per image an array [N,6] (x1, y1, x2, y2, score, class)."""
        images = images if isinstance(images, list) else [images]
        results = []
        for start in range(0, len(images), batch_size):
            chunk = [to_bgr(im) for im in images[start:start + batch_size]]
            results += self.infer(*self.preprocess(chunk))
        return results

    def heatmap(self, image: ImageLike) -> np.ndarray:
        """The image (BGR) overlaid with the highest objectness over anchors and levels, scaled to this image's
        min-max, with a colour bar in absolute values: where the model looks."""
        return objectness_picture(self, to_bgr(image))

    def measure_fps(self, image: ImageLike, iterations: int = 100, warmup: int = 10) -> dict:
        """Milliseconds per image for the model alone and end to end (letterbox + model + decode + NMS)."""
        bgr = to_bgr(image)
        batch, metas = self.preprocess([bgr])
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for _ in range(warmup):
            self.infer(*self.preprocess([bgr]))
        sync()
        x = batch.to(self.device)
        start = time.perf_counter()
        for _ in range(iterations):
            self.run_network(x)
        sync()
        model_ms = (time.perf_counter() - start) / iterations * 1000
        start = time.perf_counter()
        for _ in range(iterations):
            self.infer(*self.preprocess([bgr]))
        sync()
        e2e_ms = (time.perf_counter() - start) / iterations * 1000
        return {"model_ms": model_ms, "model_fps": 1000 / model_ms, "e2e_ms": e2e_ms, "e2e_fps": 1000 / e2e_ms}

    def detect_image(self, image: ImageLike, detections: np.ndarray | None = None) -> np.ndarray:
        """The image (BGR) with boxes, class names and scores drawn."""
        bgr = to_bgr(image)
        if detections is None:
            detections = self.predict(bgr)[0]
        return draw_detections(bgr, detections, self.class_names)

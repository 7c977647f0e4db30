"""One optimisation step (forward, loss, backward, clip, optimiser, EMA), run eagerly or replayed as a CUDA graph.

A YOLOv4-tiny step at batch 64 is ~1,000 small kernels: launched one by one from Python it is
bound by launch latency, not by the GPU (bench/RESULTS.md). Captured once as a CUDA graph it
is replayed with one call. That is possible because the step never waits for the host: the loss
is dense with fixed shapes, the GPU batches have fixed-size targets, and everything the host
changes between steps (lr, momentum, EMA weight) lives in device scalars filled before a replay.

Graphs are keyed by the input shapes (a short last batch gets its own) and share one memory pool:
every tensor that outlives a replay (weights, optimiser and EMA state, static inputs) lives
outside it, and the outputs are read before the next replay is queued.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils.engine.optim import hyper_on_device
from utils.engine.torch_utils import ModelEMA

# eager steps of a shape before it is captured: lazy initialisation (cuBLAS/cuDNN handles, the
# loss's constant cache) must happen outside capture; DDP needs 11 to settle its buckets
EAGER_BEFORE_CAPTURE, EAGER_BEFORE_CAPTURE_DDP = 3, 11
MAX_GRAPHS = 4          # distinct input shapes captured; others run eagerly
MAX_GRAD_NORM = 10.0


def graph_blocker(device: torch.device, gpu_batches: bool, scaler_enabled: bool, accumulate: int,
                  sync_bn: bool) -> str | None:
    """Why the step cannot be captured as a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return "not on CUDA"
    if not gpu_batches:
        return "CPU augmentation (batch shapes vary and the step waits for workers anyway)"
    if scaler_enabled:
        return "fp16 loss scaling checks for inf on the host"
    if accumulate > 1:
        return f"gradients accumulate over {accumulate} batches (--batch below --nbs)"
    if sync_bn:
        return "--sync-bn"
    return None


class TrainStep:
    """Callable (images, targets, last) -> (summed loss, parts); `last` = apply the optimiser after this batch."""

    def __init__(self, model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 ema: ModelEMA | None, amp: torch.dtype | None, device: torch.device, world: int, graphs: bool):
        self.raw, self.loss_fn, self.optimizer, self.scaler, self.ema = model, loss_fn, optimizer, scaler, ema
        self.amp, self.device, self.world = amp, device, world
        self.graphs_on = graphs
        self.side = torch.cuda.Stream(device) if graphs else None
        with torch.cuda.stream(self.side) if graphs else nullcontext():   # DDP built on the side stream to be capturable
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
        if graphs:
            hyper_on_device(optimizer, device)
        self.eager_before_capture = EAGER_BEFORE_CAPTURE_DDP if world > 1 else EAGER_BEFORE_CAPTURE
        self._graphs: dict[tuple, _CapturedStep] = {}
        self._seen: dict[tuple, int] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, last: bool = True):
        images, targets = self._prepare(images), targets.to(self.device, non_blocking=True).float()
        if not self.graphs_on:
            return self._eager(images, targets, last)
        key = (tuple(images.shape), images.dtype, tuple(targets.shape))
        graph = self._graphs.get(key)
        if graph is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] <= self.eager_before_capture or len(self._graphs) >= MAX_GRAPHS:
                return self._eager_on_side_stream(images, targets)
            graph = self._graphs[key] = self._capture(images, targets)
        if self.ema is not None:
            self.ema.advance()
        return graph(images, targets)

    @property
    def captured(self) -> int:
        """How many input shapes run as CUDA graphs."""
        return len(self._graphs)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float 0..1 images (both data paths, utils/data/loader.py) -> on the device, channels_last on CUDA."""
        images = images.to(self.device, non_blocking=True)
        if self.amp is None and images.dtype != torch.float32:   # half images (CUDA batches) without AMP
            images = images.float()
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, cache: bool = True):
        # autocast's weight cache must be off inside a capture (its copies would be freed after it)
        autocast = torch.autocast(self.device.type, dtype=self.amp, cache_enabled=cache) if self.amp else nullcontext()
        with autocast:
            outputs = self.model(images)
        loss, parts = self.loss_fn(outputs, targets)
        self.scaler.scale(loss * self.world).backward()   # DDP averages gradients over processes
        return loss.detach(), parts

    def _apply(self) -> None:
        """Clip, optimiser step and EMA blend: device work only (no host reads), so it can be captured."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm=MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _eager(self, images: torch.Tensor, targets: torch.Tensor, last: bool):
        loss, parts = self._forward_backward(images, targets)
        if last:
            self._apply()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.raw)
        return loss, parts

    def _eager_on_side_stream(self, images: torch.Tensor, targets: torch.Tensor):
        """An eager step before capture, on the stream captures use, as CUDA's capture recipe asks."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            result = self._eager(images, targets, last=True)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return result

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> _CapturedStep:
        torch.cuda.synchronize(self.device)
        self.optimizer.zero_grad(set_to_none=True)   # gradients are then allocated inside the graph's pool
        static_images, static_targets = images.clone(), targets.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            loss, parts = self._forward_backward(static_images, static_targets, cache=False)
            self._apply()
            if self.ema is not None:
                self.ema.blend(self.raw)
        # eager steps must not accumulate into the graph's gradient buffers
        self.optimizer.zero_grad(set_to_none=True)
        return _CapturedStep(graph, static_images, static_targets, loss, parts)


class _CapturedStep:
    """A captured step and its static input/output tensors."""

    def __init__(self, graph: torch.cuda.CUDAGraph, images: torch.Tensor, targets: torch.Tensor,
                 loss: torch.Tensor, parts: dict):
        self.graph, self.images, self.targets, self.loss, self.parts = graph, images, targets, loss, parts

    def __call__(self, images: torch.Tensor, targets: torch.Tensor):
        """Run the step on new inputs; the outputs are overwritten by the next replay."""
        self.images.copy_(images)
        self.targets.copy_(targets)
        self.graph.replay()
        return self.loss, self.parts

"""One optimisation step (forward, loss, backward, clip, optimiser, EMA), run eagerly or replayed as a CUDA graph.

A YOLOv4-tiny step at batch 64 is ~1,000 small kernels: launched one by one from Python it is
bound by launch latency, not by the GPU (bench/RESULTS.md). Captured once as a CUDA graph it
is replayed with one call. That is possible because the step never waits for the host: the loss
is dense with fixed shapes, the GPU batches have fixed-size targets, and everything the host
changes between steps (lr, momentum, EMA weight) lives in device scalars filled before a replay.

Gradients accumulated over several batches (--batch below --nbs) take two graphs per input shape,
sharing its static inputs and outputs: accumulate only (forward + backward), and accumulate + apply
(clip, optimiser, gradients zeroed in place, EMA). The gradient buffers are allocated once, outside
the graphs, and never replaced, so eager steps and replays of either graph may follow each other in
any order. Both graphs capture `TrainStep._work`, the function the eager path runs.

Graphs share one memory pool: every tensor that outlives a replay (weights, gradients, optimiser
and EMA state, static inputs and outputs) lives outside it.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils.engine.loss_scale import LossScaler
from utils.engine.optim import Optimizer, hyper_on_device, step_optimizer
from utils.engine.torch_utils import ModelEMA, compile_fixed
from utils.ops.capture_guard import CaptureGuard

# eager steps of a (shape, apply) pair before it is captured: lazy initialisation (cuBLAS/cuDNN handles,
# the loss's constant cache, optimiser state) must happen outside capture; DDP needs 11 to settle its buckets
EAGER_BEFORE_CAPTURE, EAGER_BEFORE_CAPTURE_DDP = 3, 11
MAX_GRAPHS = 4          # distinct input shapes captured; others run eagerly
MAX_GRAD_NORM = 10.0

# capture(work, pool) -> replay: records `work` (which must not run yet) and returns what reruns it
Capture = Callable[[Callable[[], None], object], Callable[[], None]]


def graph_blocker(device: torch.device, gpu_batches: bool, accumulate: int, sync_bn: bool,
                  world: int = 1, compiled: bool = False) -> str | None:
    """Why the step cannot be captured as a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return "not on CUDA"
    if not gpu_batches:
        return "CPU augmentation (batch shapes vary and the step waits for workers anyway)"
    if accumulate > 1 and world > 1:     # DDP's reducer under two graphs is untested
        return f"gradients accumulate over {accumulate} batches (--batch below --nbs) across {world} processes"
    if sync_bn:
        return "--sync-bn"
    if compiled and world > 1:           # torch 2.11: the compiled DDP step's capture fails (H200 x2, 2026-12-04)
        return f"--compile across {world} processes (its compiled DDP step cannot be captured)"
    return None


def cuda_graph_capture(work: Callable[[], None], pool) -> Callable[[], None]:
    """Capture `work` as a CUDA graph in `pool`; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        work()
    return graph.replay


class TrainStep:
    """Callable (images, targets, last) -> (summed loss, parts); `last` = apply the optimiser after this batch.

    capture: how a graph is recorded (cuda_graph_capture; tests give a stand-in that replays `work` eagerly,
    to check the graph bookkeeping on the CPU).
    """

    def __init__(self, model: nn.Module, loss_fn, optimizer: Optimizer, scaler: LossScaler,
                 ema: ModelEMA | None, amp: torch.dtype | None, device: torch.device, world: int, graphs: bool,
                 capture: Capture = cuda_graph_capture, compiled: bool = False,
                 capture_guard: CaptureGuard | None = None):
        self.raw, self.loss_fn, self.optimizer, self.scaler, self.ema = model, loss_fn, optimizer, scaler, ema
        self.amp, self.device, self.world = amp, device, world
        self.graphs_on, self._record = graphs, capture
        # other threads' CUDA work (the evaluation) must not run inside a capture
        self._capture_guard = capture_guard or CaptureGuard()
        self.side = torch.cuda.Stream(device) if graphs and device.type == "cuda" else None
        with self._on_side():                       # DDP built on the side stream to be capturable
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids) if world > 1 else model
        # compiled during the eager steps before capture; a capture records the compiled kernels
        self.forward = compile_fixed(self.model) if compiled else self.model
        self.loss = compile_fixed(loss_fn) if compiled else loss_fn
        if graphs:
            hyper_on_device(optimizer, device)
        self.eager_before_capture = EAGER_BEFORE_CAPTURE_DDP if world > 1 else EAGER_BEFORE_CAPTURE
        self._statics: dict[tuple, _StaticIO] = {}               # per input shape
        self._graphs: dict[tuple, Callable[[], None]] = {}       # (shape, last) -> replay
        self._seen: dict[tuple, int] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.side is not None else None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, last: bool = True):
        images, targets = self._prepare(images), targets.to(self.device, non_blocking=True).float()
        if not self.graphs_on:
            return self._eager(images, targets, last)
        shape = (tuple(images.shape), images.dtype, tuple(targets.shape))
        key = (shape, last)
        replay = self._graphs.get(key)
        if replay is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            full = shape not in self._statics and len(self._statics) >= MAX_GRAPHS
            if self._seen[key] <= self.eager_before_capture or full:
                return self._eager_on_side_stream(images, targets, last)
            replay = self._graphs[key] = self._capture(shape, images, targets, last)
        static = self._statics[shape]
        if last and self.ema is not None:
            self.ema.advance()
        static.images.copy_(images)
        static.targets.copy_(targets)
        replay()
        return static.results()

    @property
    def captured(self) -> int:
        """How many (input shape, apply or not) steps run as CUDA graphs."""
        return len(self._graphs)

    def _on_side(self):
        return torch.cuda.stream(self.side) if self.side is not None else nullcontext()

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float 0..1 images (both data paths, utils/data/loader.py) -> on the device, channels_last on CUDA."""
        images = images.to(self.device, non_blocking=True)
        if self.amp is None and images.dtype != torch.float32:   # half images (CUDA batches) without AMP
            images = images.float()
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _forward_backward(self, images: torch.Tensor, targets: torch.Tensor, cache: bool):
        # autocast's weight cache must be off inside a capture (its copies would be freed after it)
        autocast = torch.autocast(self.device.type, dtype=self.amp, cache_enabled=cache) if self.amp else nullcontext()
        with autocast:
            outputs = self.forward(images)
        loss, parts = self.loss(outputs, targets)
        # gradients add into the existing .grad buffers in place (autograd outside create_graph)
        self.scaler.scale_loss(loss * self.world).backward()   # DDP averages gradients over processes
        return loss.detach(), parts

    def _apply(self) -> None:
        """Unscale, clip, optimiser step (skipped on the device after an fp16 overflow), scale update: device work
        only (no host reads), so it can be captured."""
        found_inf = self.scaler.unscale(self._grads())
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm=MAX_GRAD_NORM)
        step_optimizer(self.optimizer, found_inf)
        self.scaler.update()

    def _grads(self) -> list[torch.Tensor]:
        """The optimiser's gradient buffers (allocated by the first backward, never replaced)."""
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _zero_grads(self) -> None:
        """Zero the gradient buffers in place: captured graphs hold their addresses, so they are never replaced."""
        grads = self._grads()
        if grads:
            torch._foreach_zero_(grads)

    def _work(self, images: torch.Tensor, targets: torch.Tensor, last: bool, cache: bool = True):
        """What one batch does: forward and backward, and with `last` apply, zero the gradients, blend the EMA.

        The eager path runs it; a capture records it unchanged (the host's EMA count is advanced outside).
        """
        loss, parts = self._forward_backward(images, targets, cache)
        if last:
            self._apply()
            self._zero_grads()
            if self.ema is not None:
                self.ema.blend(self.raw)
        return loss, parts

    def _eager(self, images: torch.Tensor, targets: torch.Tensor, last: bool):
        if last and self.ema is not None:
            self.ema.advance()
        return self._work(images, targets, last)

    def _eager_on_side_stream(self, images: torch.Tensor, targets: torch.Tensor, last: bool):
        """An eager step before capture, on the stream captures use, as CUDA's capture recipe asks."""
        if self.side is None:
            return self._eager(images, targets, last)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_side():
            result = self._eager(images, targets, last)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return result

    def _capture(self, shape: tuple, images: torch.Tensor, targets: torch.Tensor, last: bool) -> Callable[[], None]:
        with self._capture_guard.capturing():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            static = self._statics.get(shape)
            if static is None:      # allocated outside the pool: they outlive every replay
                static = self._statics[shape] = _StaticIO(images.clone(), targets.clone(), self.device)

            def work() -> None:
                loss, parts = self._work(static.images, static.targets, last, cache=False)
                static.store(loss, parts)

            return self._record(work, self._pool)


class _StaticIO:
    """The fixed input and output tensors of one input shape's graphs; a replay overwrites the outputs."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, device: torch.device):
        self.images, self.targets = images, targets
        self.out = torch.zeros(4, device=device)     # loss, then the parts
        self.keys: tuple[str, ...] = ()

    def store(self, loss: torch.Tensor, parts: dict) -> None:
        self.keys = tuple(parts)
        self.out.copy_(torch.stack([loss.float(), *(parts[k].float() for k in self.keys)]))

    def results(self) -> tuple[torch.Tensor, dict]:
        """(loss, parts) as views of the outputs: read them before the next replay."""
        return self.out[0], {k: self.out[i + 1] for i, k in enumerate(self.keys)}

"""Device, seeding, EMA and distributed helpers."""
from __future__ import annotations

import math
import os
import random
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def select_device(device: str | torch.device | None = None) -> torch.device:
    """'cuda', 'cuda:1', '0', 'cpu' or None (CUDA when present) -> torch.device; unavailable CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or ("cuda" if torch.cuda.is_available() else "cpu")).strip().lower()
    if name.isdigit():
        name = f"cuda:{name}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or a GPU index") from None
    if dev.type == "cuda" and dev.index is None:   # an explicit index, so devices compare equal
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


COMPILE_BACKEND = "inductor"   # torch.compile's default (Triton kernels on CUDA); tests trace with "eager"


def compile_fixed(fn):
    """torch.compile for fixed shapes (--compile): the training step's model and loss, the GPU augmenter's pixels."""
    return torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class ModelEMA:
    """Exponential moving average of weights; decay ramps up as 1 - exp(-updates / tau) (YOLOv5's schedule).

    Floating-point parameters and buffers (BN running statistics) are averaged with fused foreach
    calls; integer buffers (BN batch counters) are not used by the layers here and stay as copied.
    `update` = `advance` (host: count, and write this update's blend weight into a device scalar) +
    `blend` (device only, so a captured CUDA graph can replay it while the weight changes).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates
        self._targets = [t for t in self._tensors(self.ema) if t.dtype.is_floating_point]
        self._weight = torch.zeros((), device=self._targets[0].device)   # share of the new weights
        self._source_of: nn.Module | None = None
        self._sources: list[torch.Tensor] = []

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [*model.parameters(), *model.buffers()]

    def update(self, model: nn.Module) -> None:
        """Blend the current weights in."""
        self.advance()
        self.blend(model)

    def advance(self) -> None:
        """Count one update and set its blend weight (1 - decay)."""
        self.updates += 1
        self._weight.fill_(1 - self.decay * (1 - math.exp(-self.updates / self.tau)))

    @torch.no_grad()
    def blend(self, model: nn.Module) -> None:
        """ema += weight * (model - ema), reading the weight from the device."""
        model = unwrap(model)
        if self._source_of is not model:   # the list is rebuilt only if another model is passed
            self._source_of = model
            self._sources = [t for t in self._tensors(model) if t.dtype.is_floating_point]
        step = torch._foreach_sub(self._sources, self._targets)
        torch._foreach_mul_(step, self._weight)
        torch._foreach_add_(self._targets, step)


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) when launched by torchrun."""
    if distributed_env()[2] > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def is_main_process() -> bool:
    """Rank 0, or not distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


class CudaGraphForward:
    """A model's forward pass captured as a CUDA graph for one input shape: replayed without per-kernel launches."""

    def __init__(self, model: nn.Module, example: torch.Tensor, warmup: int = 3):
        self.input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):          # cuDNN picks its kernels before capture
                model(self.input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.output = model(self.input)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs for x; they live in the graph's buffers until the next call."""
        self.input.copy_(x)
        self.graph.replay()
        return self.output

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
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or a GPU index") from None


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
    """Exponential moving average of weights; decay ramps up as 1 - exp(-updates / tau) (YOLOv5's schedule)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights in; float tensors only (BN counters are copied)."""
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        ema_state = self.ema.state_dict()
        model_state = unwrap(model).state_dict()
        floats = [k for k, v in ema_state.items() if v.dtype.is_floating_point]
        torch._foreach_mul_([ema_state[k] for k in floats], d)
        torch._foreach_add_([ema_state[k] for k in floats], [model_state[k].detach() for k in floats], alpha=1 - d)
        for k, v in ema_state.items():
            if not v.dtype.is_floating_point:
                v.copy_(model_state[k])


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) when launched by torchrun."""
    if distributed_env()[2] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def is_main_process() -> bool:
    """Rank 0, or not distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()

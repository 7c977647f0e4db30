"""--cache auto: where the decoded training images are kept, from their decoded size and the memory free now.

The sizes come from the records (image headers), at the form the code stores: the padded uint8
tensor [N,H,3,W] of the batched augmenter, or the fitted images the CPU workers read. Nothing is
decoded to decide.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils.data.dataset import Record
from utils.ops.images import fitted_size

GPU_SHARE = 0.4    # of free GPU memory: the rest is for activations, CUDA graphs and evaluation
RAM_SHARE = 0.5    # of available RAM: the rest is for workers, the OS and other processes
GIB = 2**30


@dataclass(frozen=True)
class CachePlan:
    """The cache chosen (none, ram or gpu) and why, for the start-up table."""

    choice: str
    reason: str


@dataclass(frozen=True)
class DecodedBytes:
    """Bytes the cache would hold: the padded tensors (3 x H x W bytes an image; train, val) and the fitted
    training images."""

    padded: int
    fitted: int
    val: int


def decoded_bytes(train: list[Record], val_count: int, input_shape: tuple[int, int]) -> DecodedBytes:
    """What each cache form needs, from the records' header sizes (the rounding of load_resized)."""
    per_image = 3 * input_shape[0] * input_shape[1]
    fitted = sum(3 * h * w for h, w in (fitted_size(r.height, r.width, input_shape) for r in train))
    return DecodedBytes(len(train) * per_image, fitted, val_count * per_image)


def available_ram() -> int | None:
    """Bytes of RAM the kernel can give without swapping (MemAvailable), or free pages; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (small sets would read 0.00 GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def plan_cache(requested: str, sizes: DecodedBytes, device: torch.device, gpu_possible: bool, processes: int = 1,
               free_gpu: int | None = None, free_ram: int | None = None) -> CachePlan:
    """--cache as given, or for `auto`: gpu when it fits GPU_SHARE of free GPU memory, else ram, else none.

    gpu_possible: batched augmentation on CUDA may run (not --augment cpu). processes: training processes on
    this host, each holding its own copy in RAM. free_gpu / free_ram: measured when not given (tests give them).
    """
    if requested != "auto":
        return CachePlan(requested, "--cache " + requested)
    if gpu_possible and device.type == "cuda":
        free_gpu = torch.cuda.mem_get_info(device)[0] if free_gpu is None else free_gpu
        need = sizes.padded + sizes.val
        if need < GPU_SHARE * free_gpu:
            return CachePlan("gpu", f"{_gib(need)} of images fit in {GPU_SHARE:.0%} of the {_gib(free_gpu)} "
                                    f"free GPU memory")
        gpu_note = f"{_gib(need)} of images exceed {GPU_SHARE:.0%} of the {_gib(free_gpu)} free GPU memory; "
        # the host path holds the decoded list, the padded tensor and its pinned copy at once
        host = sizes.fitted + 2 * sizes.padded
    else:
        gpu_note = ""
        host = sizes.fitted + sizes.val
    free_ram = available_ram() if free_ram is None else free_ram
    need = host * max(1, processes)
    if free_ram is None:
        return CachePlan("none", gpu_note + "available RAM unknown: images are decoded on the fly")
    if need < RAM_SHARE * free_ram:
        return CachePlan("ram", gpu_note + f"{_gib(need)} fit in {RAM_SHARE:.0%} of the {_gib(free_ram)} available RAM")
    return CachePlan("none", gpu_note + f"{_gib(need)} exceed {RAM_SHARE:.0%} of the {_gib(free_ram)} available RAM: "
                             "images are decoded on the fly")

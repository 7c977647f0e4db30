"""--batch auto: the nominal batch on a GPU where its activations fit, so the default run takes the fast path.

A step at --batch 16 with --nbs 64 accumulates gradients over four batches: the same optimisation as one
batch of 64, but four times the kernel launches and graph replays for the same images. On a GPU the
default therefore trains at the nominal batch when it fits, measured by one forward and backward pass of
the model at a small probe batch; on the CPU (and where the nominal batch does not fit) it halves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nets.yolo import build_model
from utils.config import ModelConfig

CPU_BATCH = 16          # the tutorials' batch: CPU steps are compute-bound, a larger batch gains nothing
PROBE_BATCH = 4         # images in the measuring pass
GPU_SHARE = 0.5         # of the memory free after the probe: the rest is for the optimiser, EMA, graphs, evaluation


@dataclass(frozen=True)
class BatchChoice:
    """The global batch chosen and why (for the start-up table)."""

    batch: int
    reason: str


def auto_batch(config: ModelConfig, device: torch.device, amp: torch.dtype | None, nominal: int,
               world: int = 1) -> BatchChoice:
    """The global batch for --batch auto: `nominal` (--nbs) on CUDA when each process's share fits
    GPU_SHARE of free memory, else the largest halving that does; CPU_BATCH (at most `nominal`) on the CPU."""
    if device.type != "cuda":
        batch = max(world, min(CPU_BATCH, nominal) // world * world)
        return BatchChoice(batch, "CPU")
    per_image = activation_bytes(config, device, amp)
    free, _ = torch.cuda.mem_get_info(device)
    per_process = max(1, nominal // world)
    while per_process > 1 and per_process * per_image > GPU_SHARE * free:
        per_process //= 2
    fits = "fits" if per_process * world >= nominal else "is what fits"
    return BatchChoice(per_process * world, f"--nbs {nominal} {fits}: {per_image / 2**20:.0f} MiB of activations an "
                                            f"image, {free / 2**30:.1f} GiB free")


def activation_bytes(config: ModelConfig, device: torch.device, amp: torch.dtype | None) -> float:
    """Peak memory one training image adds: a forward and backward pass at PROBE_BATCH, in the run's precision."""
    model = build_model(config).to(device, memory_format=torch.channels_last).train()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    images = torch.rand(PROBE_BATCH, 3, *config.input_shape, device=device).contiguous(
        memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        outputs = model(images)
    sum(o.float().square().mean() for o in outputs).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, images, outputs
    torch.cuda.empty_cache()
    return peak / PROBE_BATCH

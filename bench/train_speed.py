"""Steady-state training speed: images/s after warm-up and peak GPU memory, for any --model/--phi.

  python bench/train_speed.py --data VOCdevkit/BCCD --model yolov4-tiny --phi 0 --img 416 --batch 64 \
      --cache gpu --augment gpu --steps 60 --warmup 15

Times whole training steps (augmentation + forward + loss + backward + optimiser + EMA) with the
real Trainer on the real data (and, once, 20 batches of augmentation alone: augment_ms), synchronising
the GPU before reading the clock; --repeats windows of --steps steps, median reported (each window's
figure printed too). The full run's wall time is measured separately by timing train.py itself (see
bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.engine import train_step  # noqa: E402
from utils.engine.train_data import TrainData  # noqa: E402
from utils.config import parse_train_flags, train_parser  # noqa: E402
from utils.engine.run import prepare_run, resolve_run  # noqa: E402


def batches_forever(data: TrainData):
    """Full batches only: a small dataset's short last batch would skew images per second."""
    for epoch in itertools.count():
        for images, targets in data.batches(epoch, mosaic=True):
            if len(images) == data.batch_size:
                yield images, targets


def profile_steps(step, stream, device: torch.device, steps: int = 5) -> None:
    """torch.profiler over a few steps, split into augmentation, forward+loss, backward and optimiser."""
    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("augment"):
                images, targets = next(stream)
            with record_function("train_step"):
                step(images, targets)
        sync()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=60))


def main(argv: list[str] | None = None) -> dict:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--steps", type=int, default=60, help="timed training steps")
    own.add_argument("--warmup", type=int, default=15, help="untimed steps first (cudnn autotuning, caches)")
    own.add_argument("--repeats", type=int, default=3, help="timed windows of --steps steps; the median is reported")
    own.add_argument("--profile", action="store_true", help="also print where a few steps spend CPU and GPU time")
    own.add_argument("--cudnn-benchmark", action="store_true",
                     help="autotune cuDNN's kernels (cudnn.benchmark) instead of the trainer's heuristics")
    own.add_argument("--ddp-bucket-mb", type=float, default=None,
                     help="under torchrun: DistributedDataParallel's gradient bucket size (default 25 MB), with "
                          "gradients as bucket views (an A/B of DDP's settings, not a train.py flag)")
    bench_args, argv = own.parse_known_args(argv)
    if bench_args.ddp_bucket_mb is not None:
        train_step.DistributedDataParallel = functools.partial(
            train_step.DistributedDataParallel, bucket_cap_mb=bench_args.ddp_bucket_mb, gradient_as_bucket_view=True)
    steps, warmup = bench_args.steps, bench_args.warmup
    resolved = resolve_run(parse_train_flags(argv + ["--eval-period", "1000"], train_parser()))
    run = prepare_run(resolved, folder=Path("/tmp/train_speed"), progress=False)
    data, trainer, device, config = run.data, run.trainer, run.device, run.config
    rank, world = trainer.rank, trainer.world
    if bench_args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    step = trainer.enter_phase(trainer.phase_of(0))
    trainer.model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stream = batches_forever(data)
    first = time.perf_counter()
    for _ in range(warmup):
        images, targets = next(stream)
        step(images, targets)
    sync()
    warmup_s = time.perf_counter() - first
    start = time.perf_counter()          # augmentation alone: the host's planning and the GPU's rendering
    for _ in range(20):
        next(stream)
    sync()
    augment_ms = (time.perf_counter() - start) / 20 * 1000
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    for _ in range(bench_args.repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(stream))
        sync()
        windows.append(time.perf_counter() - start)
    elapsed = statistics.median(windows)
    seen = steps * data.batch_size
    # every rank ran the same number of steps on its share of the global batch
    result = {"model": config.model.model, "backbone": config.model.backbone,
              "attention": config.model.uniform_attention() or "mixed",
              "img": config.model.input_shape[0], "batch": config.train.batch, "gpus": world,
              "cudnn_benchmark": torch.backends.cudnn.benchmark, "cuda_graphs": step.captured,
              "compile": config.train.compile, "ddp_bucket_mb": bench_args.ddp_bucket_mb,
              "augment": "gpu" if data.on_gpu else f"cpu x{config.data.workers}", "amp": str(trainer.amp),
              "warmup_s": warmup_s, "augment_ms": augment_ms,
              "img_per_s": seen * world / elapsed, "ms_per_step": elapsed / steps * 1000,
              "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
              "img_per_s_windows": "/".join(f"{seen * world / w:.0f}" for w in windows)}
    if bench_args.profile:
        profile_steps(step, stream, device)
    if rank == 0:
        print("train_speed " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()

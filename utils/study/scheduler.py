"""Packs subprocess jobs onto devices: N at once per device, each pinned by CUDA_VISIBLE_DEVICES, one scheduler.

A job that fails is just an outcome; the others go on. A job that succeeds can hand on a follow-up job (a
study run's test evaluation after its training), which goes first to the next free slot. Ctrl-C (or SIGTERM)
reaches the children, which keep their last checkpointed epoch, and the scheduler waits for them before it
re-raises.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from utils.log import get_logger

log = get_logger(__name__)
RUN_MEMORY_GIB = 4.0      # what auto --jobs reserves per run on a GPU (a YOLOv4-tiny run at batch 64 uses 1.6)
STOP_WAIT_S = 60.0        # how long interrupted children get to write their last checkpoint


@dataclass
class Job:
    """A command with its log files, extra environment and the job to queue when it succeeds."""

    key: str
    argv: list[str]
    stdout: Path
    stderr: Path
    env: dict[str, str] = field(default_factory=dict)
    then: Job | None = None        # queued first when this job exits with status 0


@dataclass
class Outcome:
    key: str
    returncode: int
    seconds: float
    device: str | None


def free_gpu_memory_gib() -> dict[str, float]:
    """Free memory per GPU index from nvidia-smi (no CUDA context is made in this process); {} without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run([smi, "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    free = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        if index.strip().isdigit() and mib.strip().replace(".", "", 1).isdigit():
            free[index.strip()] = float(mib) / 1024
    return free


def auto_jobs(devices: list[str | None], runs: int, cpus: int | None = None,
              free_gib: dict[str, float] | None = None) -> int:
    """Runs at once per device: 1 on CPU; on GPUs as many as the least free memory holds (RUN_MEMORY_GIB each),
    at most one per CPU core of the device's share, and no more than there are runs per device."""
    if devices == [None]:
        return 1
    cpus = cpus or os.cpu_count() or 1
    free = free_gpu_memory_gib() if free_gib is None else free_gib
    unknown = [d for d in devices if str(d) not in free]
    if unknown:
        log.info("free memory of GPU %s unknown (no nvidia-smi, or not a plain index): 1 run at once; "
                 "pass --jobs N to pack more", unknown[0])
        return 1
    by_memory = int(min(free[str(d)] for d in devices) // RUN_MEMORY_GIB)
    per_device = -(-runs // len(devices))
    return max(1, min(by_memory, max(1, cpus // len(devices)), per_device))


def thread_share(cpus: int | None, concurrent: int) -> str:
    """OMP/MKL threads per child so the children together use the cores once."""
    return str(max(1, (cpus or os.cpu_count() or 1) // max(1, concurrent)))


def run_jobs(jobs: list[Job], devices: list[str | None], per_device: int, on_done: Callable[[Job, Outcome], None],
             env: dict[str, str] | None = None, poll_s: float = 0.2,
             on_start: Callable[[Job, str | None], None] | None = None) -> list[Outcome]:
    """Run every job and the follow-ups of those that succeed, at most `per_device` at once on each device (None: no
    CUDA_VISIBLE_DEVICES); a new job goes to the least busy device. on_done is called as each finishes."""
    queue, running, outcomes = deque(jobs), {}, []
    load = {i: 0 for i in range(len(devices))}
    base = {**os.environ, **(env or {})}
    threads = thread_share(None, min(len(jobs), per_device * len(devices)))
    try:
        while queue or running:
            while queue and min(load.values()) < per_device:
                slot = min(load, key=lambda i: (load[i], i))
                job, device = queue.popleft(), devices[slot]
                child_env = {**base, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **job.env}
                if device is not None:
                    child_env["CUDA_VISIBLE_DEVICES"] = device
                job.stdout.parent.mkdir(parents=True, exist_ok=True)
                with open(job.stdout, "ab") as out, open(job.stderr, "wb") as err:
                    process = subprocess.Popen(job.argv, stdout=out, stderr=err, env=child_env)
                running[process] = (job, slot, time.perf_counter())
                load[slot] += 1
                if on_start:
                    on_start(job, device)
            for process in [p for p in running if p.poll() is not None]:
                job, slot, start = running.pop(process)
                load[slot] -= 1
                outcome = Outcome(job.key, process.returncode, time.perf_counter() - start, devices[slot])
                outcomes.append(outcome)
                if process.returncode == 0 and job.then is not None:
                    queue.appendleft(job.then)
                on_done(job, outcome)
            time.sleep(poll_s)
    except BaseException:
        _stop(list(running))
        raise
    return outcomes


def _stop(processes: list[subprocess.Popen]) -> None:
    """Stop children as Ctrl-C does (SIGINT: they keep their last checkpointed epoch), then terminate, then kill.

    A Ctrl-C in the terminal reached them already; after a short grace the rest (e.g. the study got SIGTERM)
    get their SIGINT here.
    """
    time.sleep(2.0 if any(p.poll() is None for p in processes) else 0.0)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_WAIT_S
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()

"""Tensors made on one CUDA stream and used on another: the one way the project hands them over.

Threads that all issue work on CUDA's legacy default stream run in one queue: a thread waiting for its own
result (a copy to the host) also waits for everything the others queued before it. predict.py's device
path gives the model, the reader and the painter a stream each; train.py makes batches on a side stream.
Work on a stream made here (a non-blocking pool stream) runs beside the legacy stream's, not after it.

A tensor handed over needs two things on the stream that uses it: to wait for the event recorded after it
was made, and `record_stream`, so that the caching allocator does not give its memory to new work on the
making stream while the using stream may still read it. On the CPU everything here is a no-op.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch

HIGH_PRIORITY = -1      # CUDA schedules this stream's waiting kernels before the default priority's (0)


def side_stream(device: torch.device, high_priority: bool = False) -> torch.cuda.Stream | None:
    """A stream of its own on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=HIGH_PRIORITY if high_priority else 0)


def on_stream(stream: torch.cuda.Stream | None):
    """Context in which CUDA work goes to `stream` (nothing changes for None)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def made_event(device: torch.device) -> torch.cuda.Event | None:
    """An event marking what the current stream has queued so far (None off CUDA)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def adopt(tensors: Iterable[torch.Tensor], made: torch.cuda.Event | None) -> None:
    """Make tensors recorded by `made` safe to use on the current stream: it waits for them, and their memory
    is not reused before its work on them is done."""
    if made is None:
        return
    tensors = [t for t in tensors if t.device.type == "cuda"]
    if not tensors:
        return
    stream = torch.cuda.current_stream(tensors[0].device)
    stream.wait_event(made)
    for tensor in tensors:
        tensor.record_stream(stream)

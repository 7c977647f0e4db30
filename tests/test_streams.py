"""Tensors handed from one CUDA stream to another (utils/ops/streams.py): no-ops on the CPU; on CUDA the using
stream sees the finished values and the memory is not reused under it."""
from __future__ import annotations

import pytest
import torch

from utils.ops.streams import adopt, made_event, on_stream, side_stream


def test_cpu_is_left_as_it_is():
    cpu = torch.device("cpu")
    assert side_stream(cpu) is None and side_stream(cpu, high_priority=True) is None
    assert made_event(cpu) is None
    x = torch.arange(4)
    with on_stream(None):
        adopt([x], None)                  # nothing to wait for, nothing recorded
        assert x.add(1).tolist() == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hand_over_waits_for_the_making_stream():
    device = torch.device("cuda")
    maker, user = side_stream(device), side_stream(device, high_priority=True)
    assert user.priority < maker.priority                       # lower number: scheduled first
    a = torch.randn(2048, 2048, device=device)
    torch.cuda.synchronize()
    with on_stream(maker):
        torch.cuda._sleep(50_000_000)                           # the maker is busy well past the hand-over
        made = a @ a
        event = made_event(device)
    expected = (a.double() @ a.double()).float()
    with on_stream(user):
        adopt([made], event)
        total = made.abs().mean()
    del made                                                    # freed while the user may still read it
    with on_stream(maker):
        torch.full((2048, 2048), float("nan"), device=device)   # would take the memory if it were not recorded
    user.synchronize()
    assert torch.isclose(total, expected.abs().mean(), rtol=1e-3)     # no NaN read, no unfinished values

"""The background checkpoint writer: never blocks the loop, newest state per path wins, errors surface."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from utils.engine import checkpoint
from utils.engine.checkpoint import CheckpointWriter


def test_newest_state_per_path_wins_and_wait_flushes(tmp_path, monkeypatch):
    real_save, written = checkpoint.save_checkpoint, []
    started, gate = threading.Event(), threading.Event()

    def slow_save(ckpt, path):
        started.set()
        gate.wait(5)                      # the first write blocks until every job is queued
        written.append((path.name, ckpt["epoch"]))
        real_save(ckpt, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    writer = CheckpointWriter()
    start = time.perf_counter()
    for epoch in range(1, 6):
        jobs = [({"epoch": epoch}, tmp_path / "last.pt")]
        if epoch in (2, 4):
            jobs.append(({"epoch": epoch}, tmp_path / "best.pt"))
        writer.submit(jobs)
        if epoch == 1:
            started.wait(5)
    assert time.perf_counter() - start < 1.0      # submitting never waited for the blocked write
    gate.set()
    writer.wait()
    assert written[0] == ("last.pt", 1)           # already being written when the rest arrived
    assert sorted(written[1:]) == [("best.pt", 4), ("last.pt", 5)]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 5
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 4


def test_a_failed_write_is_raised(tmp_path, monkeypatch):
    def failing_save(ckpt, path):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_checkpoint", failing_save)
    writer = CheckpointWriter()
    writer.submit([({"epoch": 1}, tmp_path / "last.pt")])
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()                                   # reported once

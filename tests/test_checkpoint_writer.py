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


def test_fast_epochs_copy_a_resume_checkpoint_only_when_one_is_due(tmp_path, monkeypatch):
    """An epoch's checkpoint is copied off the device when it is evaluated, the last, a --save-period epoch, or
    when LAST_PT_SECONDS passed since the last copy (the first epoch always): not for every fast epoch."""
    import train
    from utils.data.sample_data import make_sample_dataset
    from utils.engine import trainer

    data = make_sample_dataset(tmp_path / "voc", n_train=4, n_val=2, n_test=2, size=(64, 64))
    copied = []
    real_copy = trainer.detached_copy
    monkeypatch.setattr(trainer, "detached_copy", lambda ckpt: copied.append(ckpt["epoch"]) or real_copy(ckpt))
    monkeypatch.setattr(trainer, "LAST_PT_SECONDS", 1e9)
    out = train.main(["--data", str(data), "--epochs", "7", "--eval-period", "3", "--save-period", "5",
                      "--save-dir", str(tmp_path / "logs"), "--img", "64", "--batch", "4", "--workers", "0",
                      "--device", "cpu"])
    assert copied == [1, 3, 5, 6, 7]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 7
    assert torch.load(out / "epoch5.pt", weights_only=True)["epoch"] == 5

    copied.clear()
    monkeypatch.setattr(trainer, "LAST_PT_SECONDS", 0.0)
    train.main(["--data", str(data), "--epochs", "3", "--eval-period", "3", "--save-dir", str(tmp_path / "logs"),
                "--name", "every", "--img", "64", "--batch", "4", "--workers", "0", "--device", "cpu"])
    assert copied == [1, 2, 3]

"""The epoch ledger: an epoch's mAP computed in the background, its checkpoints written only once it is judged sane."""
from __future__ import annotations

import csv
import threading
from concurrent.futures import Future

import torch

from utils.engine.checkpoint import CheckpointWriter
from utils.engine.epoch_ledger import EpochLedger, FinishedEpoch


def ledger(tmp_path, **kw) -> EpochLedger:
    book = EpochLedger(tmp_path, epochs=9, save_period=0, writer=CheckpointWriter(),
                       fitness=lambda m: m["map50"], val_has_objects=True, best_fitness=-1.0, saved_epoch=0, **kw)
    book.start_results(0)
    return book


def epoch(number: int, metrics: Future | None) -> FinishedEpoch:
    ckpt = {"model": {"w": torch.tensor([float(number)])}, "config": {}, "hyp": {}, "epoch": number,
            "metrics": {}, "train_args": {}, "best_fitness": None}
    return FinishedEpoch(number, [1.0, 0.5, 0.3, 0.2], 0.01, 1.5, ckpt, metrics)


def rows(tmp_path) -> list[dict]:
    with open(tmp_path / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def saved_epoch(path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


def metrics(map50: float) -> dict:
    return {"map50": map50, "map50_95": map50 / 2, "map50_voc": map50}


def test_an_epoch_waits_for_both_its_metrics_and_its_verdict(tmp_path):
    book = ledger(tmp_path)
    release = threading.Event()
    pending = book.metrics_later(lambda: (release.wait(5), metrics(0.4))[1])
    book.hold(epoch(1, pending))
    book.judge(True)                       # sane, but the mAP is still being computed: nothing written
    assert rows(tmp_path) == [] and not (tmp_path / "last.pt").exists()
    release.set()
    pending.result()
    book.poll()
    book.writer.wait()
    assert [r["epoch"] for r in rows(tmp_path)] == ["1"] and float(rows(tmp_path)[0]["mAP50"]) == 0.4
    assert saved_epoch(tmp_path / "last.pt") == 1 and saved_epoch(tmp_path / "best.pt") == 1
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metrics"]["map50"] == 0.4 and best["best_fitness"] == 0.4
    book.finish(True)


def test_best_follows_fitness_and_an_exploded_epoch_is_logged_but_not_saved(tmp_path):
    book = ledger(tmp_path)
    for number, score, sane in ((1, 0.5, True), (2, 0.3, True), (3, 0.9, False)):
        done = Future()
        done.set_result(metrics(score))
        book.hold(epoch(number, done))
        book.judge(sane, "loss 1e4")
    book.writer.wait()
    assert [r["epoch"] for r in rows(tmp_path)] == ["1", "2", "3"]
    assert saved_epoch(tmp_path / "last.pt") == 2 and saved_epoch(tmp_path / "best.pt") == 1
    assert book.saved_epoch == 2 and book.best_fitness == 0.5     # the exploded epoch's 0.9 does not count
    book.finish(True)


def test_holding_the_next_epoch_settles_the_previous_one_and_finish_waits(tmp_path):
    book = ledger(tmp_path)
    book.hold(epoch(1, book.metrics_later(lambda: metrics(0.2))))   # never judged: the next hold settles it
    book.hold(epoch(2, None))                                       # not evaluated this epoch
    assert [r["epoch"] for r in rows(tmp_path)] == ["1"]
    final = book.finish(True)
    assert [r["epoch"] for r in rows(tmp_path)] == ["1", "2"] and rows(tmp_path)[1]["mAP50"] == "nan"
    assert saved_epoch(tmp_path / "last.pt") == 2 and saved_epoch(tmp_path / "best.pt") == 1
    assert final["map50"] != final["map50"]     # the last epoch was not evaluated


def test_epochs_without_a_checkpoint_get_their_rows_and_finish_says_what_last_pt_keeps(tmp_path, caplog):
    """An epoch with no checkpoint due (fast epochs, trainer.LAST_PT_SECONDS) is settled like any other, writes
    no last.pt, and a run stopped there (Ctrl-C) logs which epoch last.pt keeps."""
    book = ledger(tmp_path)
    book.hold(epoch(1, None))
    for number in (2, 3):
        book.judge(True)
        unsaved = epoch(number, None)
        unsaved.checkpoint = None
        book.hold(unsaved)
    with caplog.at_level("INFO", logger="utils.engine.epoch_ledger"):
        book.finish(True)
    assert [r["epoch"] for r in rows(tmp_path)] == ["1", "2", "3"]
    assert saved_epoch(tmp_path / "last.pt") == 1 and book.saved_epoch == 1
    assert "last.pt keeps epoch 1" in caplog.text and "trains epochs 2-3 again" in caplog.text

"""What becomes of a finished epoch: its metrics, best.pt / last.pt / epochN.pt, its results.csv row, the log line.

An epoch's detections are made when it ends (on the GPU, with its weights); their mAP is computed on a
background thread while the next epoch trains. The epoch is *settled* once two things are known:
its metrics, and whether its weights are sane (the next epoch's first loss read, DivergenceWatch).
Only then are its checkpoints written (or dropped, when the weights exploded) and its row appended, so
results.csv never ends before last.pt; last.pt trails it only by epochs that had no checkpoint due
(trainer.LAST_PT_SECONDS), and a resume drops those rows and trains them again. On a long epoch the metrics
are ready long before the next settle point; on a short one they overlap the next epoch's training.
"""
from __future__ import annotations

import csv
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.engine.checkpoint import CheckpointWriter, write_error
from utils.log import get_logger
from utils.ops.plots import load_plotting, plot_results

log = get_logger(__name__)
# mAP50 / mAP50-95: COCO definitions (what get_map.py reports); mAP50_voc: VOC all-point AP at IoU 0.5
RESULT_FIELDS = ["epoch", "loss", "box_loss", "obj_loss", "cls_loss", "lr", "mAP50", "mAP50-95", "mAP50_voc",
                 "seconds"]
NOT_EVALUATED = {"map50": float("nan"), "map50_95": float("nan"), "map50_voc": float("nan")}
PLOT_SECONDS = 30.0   # loss.png / map.png are redrawn at most this often, and after the last epoch
INFERENCE_KEYS = ("model", "config", "hyp", "epoch", "metrics", "train_args", "best_fitness")


@dataclass
class FinishedEpoch:
    """An epoch waiting to be settled."""

    number: int
    losses: list[float]          # total, box, obj, cls per image
    lr: float
    seconds: float               # training and the evaluation's inference (its mAP runs in the background)
    checkpoint: dict | None      # its full (resume) checkpoint; None when its loss was already exploding or
                                 # none was due (trainer.LAST_PT_SECONDS)
    metrics: Future | None       # None when this epoch was not evaluated
    sane: bool | None = None     # its weights' verdict, from the next loss read; None while unknown
    why: str = ""                # what the loss read was when it was not sane


class EpochLedger:
    """Holds back at most one finished epoch and settles it; owns results.csv and the plots."""

    def __init__(self, run_dir: Path, epochs: int, save_period: int, writer: CheckpointWriter,
                 fitness: Callable[[dict], float], val_has_objects: bool, best_fitness: float, saved_epoch: int):
        self.run_dir, self.epochs, self.save_period, self.writer = run_dir, epochs, save_period, writer
        self.fitness, self.val_has_objects = fitness, val_has_objects
        self.best_fitness, self.saved_epoch = best_fitness, saved_epoch
        self.last_metrics: dict = {}
        self._settled_epoch = saved_epoch      # the last epoch with a results.csv row
        self._held: FinishedEpoch | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="epoch-metrics")
        self._plotting_loaded = False
        self._plotted = time.time()   # the first plot after PLOT_SECONDS

    def metrics_later(self, compute: Callable[[], dict]) -> Future:
        """Run `compute` (an mAP over detections already made) on the background thread."""
        if not self._plotting_loaded:   # matplotlib's import while training, not after the last epoch; not at
            self._pool.submit(load_plotting)    # start-up either, where DataLoader workers fork (import locks)
            self._plotting_loaded = True
        return self._pool.submit(compute)

    def settle(self) -> None:
        """Settle the held epoch now, waiting for its metrics (an unjudged one counts as sane: no read said otherwise)."""
        if self._held is not None:
            self._settle(self._held.sane if self._held.sane is not None else True)

    def hold(self, epoch: FinishedEpoch) -> None:
        """Hold a finished epoch until it can be settled; an epoch still held is settled first (waiting)."""
        self.settle()
        self._held = epoch

    def judge(self, sane: bool, why: str = "") -> None:
        """The held epoch's weights gave a sane loss (or not: `why` says what it was); settle it when its mAP is in."""
        held = self._held
        if held is None:
            return
        if held.sane is None:
            held.sane, held.why = sane, why
        self.poll()

    def poll(self) -> None:
        """Settle the held epoch if its verdict is known and its metrics are computed."""
        held = self._held
        if held is not None and held.sane is not None and (held.metrics is None or held.metrics.done()):
            self._settle(held.sane)

    def finish(self, sane: bool, why: str = "", quiet: bool = False) -> dict:
        """Settle what is held (waiting for its metrics), wait for every write; returns the last epoch's metrics.

        quiet: an unjudged epoch that is dropped is not warned about (the divergence error says what last.pt keeps).
        """
        if self._held is not None:
            if self._held.sane is None:
                self._held.sane, self._held.why = sane, why
            self._settle(self._held.sane, quiet)
        self._pool.shutdown(wait=True)
        self.writer.wait()
        if self.saved_epoch < self._settled_epoch and not quiet:
            log.info("last.pt keeps epoch %d, the last one with a checkpoint due; a resume trains epochs %d-%d again",
                     self.saved_epoch, self.saved_epoch + 1, self._settled_epoch)
        return self.last_metrics

    def _settle(self, sane: bool, quiet: bool = False) -> None:
        held, self._held = self._held, None
        metrics = held.metrics.result() if held.metrics is not None else dict(NOT_EVALUATED)
        fitness = self.fitness(metrics) if held.metrics is not None else float("nan")
        # without objects to validate on, no epoch is better than another: best.pt follows the last one
        improved = fitness == fitness and (fitness > self.best_fitness or not self.val_has_objects)
        if held.checkpoint is not None and sane:
            if improved:
                self.best_fitness = fitness
            ckpt = held.checkpoint
            ckpt["metrics"] = {k: float(v) for k, v in metrics.items()}
            ckpt["best_fitness"] = self.best_fitness
            jobs = [(ckpt, self.run_dir / "last.pt")]
            if improved:
                jobs.append((inference_only(ckpt), self.run_dir / "best.pt"))
            if self.save_period > 0 and held.number % self.save_period == 0:
                jobs.append((inference_only(ckpt), self.run_dir / f"epoch{held.number}.pt"))
            self.writer.submit(jobs)
            self.saved_epoch = held.number
        elif held.checkpoint is not None and not quiet:
            log.warning("the weights of epoch %d give %s: not saved; last.pt keeps epoch %d", held.number,
                        held.why or "an exploding loss", self.saved_epoch)
        self._append(held, metrics)
        self._settled_epoch = held.number
        shown = f"mAP50 {metrics['map50']:.4f}  mAP50-95 {metrics['map50_95']:.4f}" if fitness == fitness else ""
        log.info("epoch %d/%d  loss %.4f  %s  %.1fs", held.number, self.epochs, held.losses[0], shown, held.seconds)
        self.last_metrics = metrics

    def _append(self, held: FinishedEpoch, metrics: dict) -> None:
        row = [held.number, *[f"{v:.5f}" for v in held.losses], f"{held.lr:.6f}", f"{metrics['map50']:.5f}",
               f"{metrics['map50_95']:.5f}", f"{metrics['map50_voc']:.5f}", f"{held.seconds:.1f}"]
        self._write([row], "a")
        if time.time() - self._plotted >= PLOT_SECONDS or held.number == self.epochs:
            try:
                plot_results(self.run_dir / "results.csv", self.run_dir)
            except OSError as exc:
                raise write_error(exc, exc.filename or self.run_dir / "loss.png") from None
            self._plotted = time.time()

    def start_results(self, start_epoch: int) -> None:
        """Start results.csv, or on resume keep only the rows of epochs already in the checkpoint."""
        path = self.run_dir / "results.csv"
        rows = []
        if start_epoch and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= start_epoch]
        self._write([RESULT_FIELDS, *rows], "w")

    def _write(self, rows: list[list], mode: str) -> None:
        """Write ("w") or append ("a") rows of results.csv; a refused write is one line naming the file."""
        path = self.run_dir / "results.csv"
        try:
            with open(path, mode, newline="") as f:
                csv.writer(f).writerows(rows)
        except OSError as exc:
            raise write_error(exc, path) from None


def inference_only(ckpt: dict) -> dict:
    """best.pt / epochN.pt: weights, config, metrics and arguments, without the resume state."""
    return {k: ckpt[k] for k in INFERENCE_KEYS}

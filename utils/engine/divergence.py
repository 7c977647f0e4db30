"""Telling an exploding training loss from noise, from the loss reads the training loop makes anyway."""
from __future__ import annotations

import bisect
import math

DIVERGE_FACTOR = 10.0     # a loss read this many times the run's median so far counts as exploding ...
DIVERGE_READS = 3         # ... and this many such reads in a row (reads come every 10 steps) stop the run


class TrainingDiverged(ValueError):
    """The loss exploded (or became NaN/inf); the message says what to run instead."""


class DivergenceWatch:
    """Tells an exploding loss from noise, from the loss reads the loop makes anyway (no extra syncs).

    The first epoch's reads are the baseline; later, a read above `factor` x the median of the good
    reads so far is a strike, and `reads` strikes in a row mean divergence. Strikes never join the median.
    """

    def __init__(self, factor: float | None = None, reads: int | None = None):
        self.factor = DIVERGE_FACTOR if factor is None else factor
        self.reads = DIVERGE_READS if reads is None else reads
        self.good: list[float] = []       # kept sorted: the median is the middle element
        self.strikes = 0
        self.judging = False
        self.last = float("nan")

    @property
    def median(self) -> float:
        return self.good[len(self.good) // 2] if self.good else float("nan")

    @property
    def exploding(self) -> bool:
        """The latest read was a strike: the weights now are not worth saving."""
        return self.strikes > 0

    def observe(self, loss: float) -> bool:
        """Record one read; True when the run has diverged (a non-finite loss, or `reads` strikes in a row)."""
        self.last = loss
        if not math.isfinite(loss):
            self.strikes = max(self.strikes, 1)
            return True
        if self.judging and self.good and loss > self.factor * self.median:
            self.strikes += 1
        else:
            self.strikes = 0
            bisect.insort(self.good, loss)
        return self.strikes >= self.reads
